"""A mergekit pre-pass: align the models a mergekit config names, and point the config at them.

mergekit merges one tensor at a time, so it cannot align hidden units itself. This pre-pass reads
a mergekit YAML config, aligns every model it names (local transformers folders) to the reference
(``base_model`` if the config has one, else the first model), writes the aligned copies as
transformers folders and writes a new config that names them. Weight matching streams: the spec
comes from the meta device, tensors are read one at a time and each aligned copy is written shard
by shard (:mod:`autoperm.folder`), so models larger than memory are aligned too. mergekit then merges
the aligned models as usual::

    autoperm mergekit merge.yml -o aligned/             # or: python -m autoperm.plugins.mergekit
    mergekit-yaml aligned/mergekit_config.yml merged/

Each aligned folder computes exactly what its source model computes (checked on example
inputs before writing, on float32 copies of bfloat16 and float16 models: see
:mod:`autoperm.equivalence`); only the order of hidden units changes, and the weights keep their
stored dtype. The reference model is not copied. Needs ``transformers`` and ``pyyaml``; mergekit itself is needed only for the merge.

>>> cfg = {"models": [{"model": "/m/a"}, {"model": "/m/b"}], "merge_method": "linear"}
>>> model_references(cfg)
['/m/a', '/m/b']
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from typing import Mapping, Sequence

import torch

from .. import infer_spec
from .._load import load_state_
from ..equivalence import same_function
from ..io import permutation_to_dict, write_text
from ._align import METHODS, align_states
from ._hf import hf_example_inputs, load_hf_model

__all__ = ["prepare_config", "align_model_dirs", "model_references", "main"]

CONFIG_NAME = "mergekit_config.yml"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def model_references(config: Mapping) -> list[str]:
    """Every model a mergekit config names, in order (``base_model`` first), without repeats."""
    refs = []
    if config.get("base_model"):
        refs.append(config["base_model"])
    refs += [m["model"] for m in config.get("models") or []]
    refs += [src["model"] for sl in config.get("slices") or [] for src in sl.get("sources") or []]
    for mod in (config.get("modules") or {}).values():
        refs += [m["model"] for m in mod.get("models") or []]
        refs += [src["model"] for sl in mod.get("slices") or [] for src in sl.get("sources") or []]
    out = []
    for r in refs:
        if not isinstance(r, str):
            raise ValueError(f"model reference {r!r}: only plain paths can be aligned")
        if r not in out:
            out.append(r)
    return out


def align_model_dirs(model_dirs: Sequence[str], out_dirs: Sequence[str | None], *, method: str = "weight",
                     example_inputs=None, inputs=None, seed: int = 0, **matcher_options) -> list[dict]:
    """Align the transformers folders ``model_dirs[1:]`` to ``model_dirs[0]``; write them to ``out_dirs``.

    ``out_dirs[i]`` is where the aligned model ``i`` goes (``None``: not written; ``out_dirs[0]``
    is ignored, the reference does not move). Returns the permutation of each model. Files other
    than weights and the config (tokenizer, generation config) are copied along.
    """
    if len(model_dirs) < 2:
        raise ValueError("aligning needs at least two models")
    for d in model_dirs:
        for o in out_dirs:
            if o is not None and (_inside(o, d) or _inside(d, o)):
                raise ValueError(f"refusing to write aligned weights into an input folder: {o}")
    if method == "weight" and example_inputs is None:  # streamed: no model is loaded whole (autoperm.folder)
        from ..folder import align_folders

        return align_folders(model_dirs, out_dirs, seed=seed, **matcher_options)
    models = [load_hf_model(d) for d in model_dirs]
    example = example_inputs if example_inputs is not None else hf_example_inputs(models[0], seed=seed)
    example = example if isinstance(example, tuple) else (example,)
    spec = infer_spec(models[0], example)
    matcher_options.setdefault("seed", seed)
    if method != "weight" and inputs is None:  # random token ids (or pixels)
        inputs = [hf_example_inputs(models[0], seed=seed + 1 + i)[0] for i in range(8)]
    aligned, perms = align_states(spec, [m.state_dict() for m in models], method, model=models[0],
                                  inputs=inputs, **matcher_options)
    for i in range(1, len(models)):
        if out_dirs[i] is None:
            continue
        verdict = same_function(models[i], models[i].state_dict(), aligned[i], example)
        if not verdict.ok:
            raise RuntimeError(f"aligned {model_dirs[i]} does not compute what the original computes ({verdict}); "
                               "not written (a bug in the inferred spec: please report it)")
        new = copy.deepcopy(models[i])  # in the stored dtype: unmoved weights are written bit for bit
        load_state_(new, aligned[i])
        _save_dir(new, model_dirs[i], out_dirs[i], perms[i])
    return perms


def _save_dir(model: torch.nn.Module, src: str, dst: str, perm) -> None:
    """save_pretrained into a temporary folder beside ``dst``, copy the other files, then move it into place."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(dst) + ".", dir=parent)
    try:
        model.save_pretrained(tmp)
        for name in os.listdir(src):
            path = os.path.join(src, name)
            target = os.path.join(tmp, name)
            if os.path.isfile(path) and not name.endswith(_WEIGHT_FILES) and not os.path.exists(target):
                shutil.copy2(path, target)
        with open(os.path.join(tmp, "autoperm_permutation.json"), "w", encoding="utf-8") as f:
            json.dump(permutation_to_dict(perm), f)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_config(config_path: str, out_dir: str, *, method: str = "weight", seed: int = 0,
                   **matcher_options) -> str:
    """Align every model ``config_path`` names and write ``out_dir/mergekit_config.yml`` naming the aligned copies.

    The reference is ``base_model`` if set, else the first model; it stays where it is. Other
    models are written to ``out_dir/<index>-<folder name>``. Returns the new config's path.
    """
    import yaml

    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    base = os.path.dirname(os.path.abspath(config_path))
    refs = model_references(config)
    dirs = [r if os.path.isabs(r) else os.path.join(base, r) for r in refs]
    for r, d in zip(refs, dirs, strict=True):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{r}: not a local model folder; download it first "
                                    "(only local folders are aligned)")
    if len(dirs) < 2:
        raise ValueError(f"{config_path} names {len(dirs)} model(s); nothing to align")
    for d in dirs:
        if _inside(out_dir, d):
            raise ValueError(f"refusing to write into the input model folder {d}; choose another -o")
    os.makedirs(out_dir, exist_ok=True)
    outs = [None] + [os.path.join(os.path.abspath(out_dir), f"{i:02d}-{os.path.basename(os.path.normpath(d))}")
                     for i, d in enumerate(dirs) if i > 0]
    align_model_dirs(dirs, outs, method=method, seed=seed, **matcher_options)
    mapping = {r: (os.path.abspath(d) if o is None else o) for r, d, o in zip(refs, dirs, outs, strict=True)}
    new = _replace_refs(config, mapping)
    path = os.path.join(out_dir, CONFIG_NAME)
    write_text(path, yaml.safe_dump(new, sort_keys=False), inputs=(config_path,))
    return path


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _replace_refs(obj, mapping: Mapping[str, str]):
    if isinstance(obj, dict):
        return {k: mapping.get(v, v) if k in ("model", "base_model") and isinstance(v, str)
                else _replace_refs(v, mapping) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_replace_refs(v, mapping) for v in obj]
    return obj


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m autoperm.plugins.mergekit",
                                     description="Align the models of a mergekit config before merging.")
    p.add_argument("config", metavar="CONFIG", help="mergekit YAML config naming local transformers model folders")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help=f"folder for the aligned models and the new {CONFIG_NAME}")
    p.add_argument("--method", choices=METHODS, default="weight",
                   help="matcher (default weight; activation and ste use random token inputs)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args) -> int:
    path = prepare_config(args.config, args.output, method=args.method, seed=args.seed)
    print(f"wrote {path}; merge with: mergekit-yaml {path} MERGED_DIR", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
