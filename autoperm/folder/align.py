"""Align transformers folders to a reference folder without loading either model: the spec from
the meta device, streaming weight matching, a streaming write of each aligned copy."""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from ..io import CheckpointError
from ..permutation import units_moved
from ._model import FolderModel, open_folder
from .match import stream_weight_matching
from .write import write_permuted_folder

__all__ = ["align_folders", "verify_folder", "VERIFY_MAX_BYTES", "AlignmentCheckError"]

VERIFY_MAX_BYTES = 2 << 30  # folders up to this size (weights on disk) are checked by running both models


class AlignmentCheckError(RuntimeError):
    """An aligned copy computes something else than its source (a bug in the inferred spec)."""


def align_folders(model_dirs: Sequence[str], out_dirs: Sequence[str | None], *, spec=None, seed: int = 0,
                  max_iter: int = 100, restarts: int = 1, cache_bytes: int = 1 << 28, verify: bool | None = None,
                  log: Callable[[str], None] | None = None, extra: dict | None = None) -> list[dict]:
    """Align the folders ``model_dirs[1:]`` to ``model_dirs[0]`` by weight matching; write them to ``out_dirs``.

    Every folder is checked (keys and shapes, from the file headers) before any weight is read;
    ``out_dirs[i]`` None: not written (``out_dirs[0]`` is ignored). ``spec``: the reference's spec if
    already inferred. ``verify`` (None: for folders up to ``VERIFY_MAX_BYTES``) loads each source and
    its aligned copy in float32 and compares their outputs; a difference over 1e-4 raises
    :class:`AlignmentCheckError` and that copy is removed. Returns the
    permutation of each model (the identity for the reference).
    """
    log = log or (lambda msg: None)
    if len(model_dirs) < 2:
        raise ValueError("aligning needs at least two models")
    t = time.perf_counter()
    ref = open_folder(model_dirs[0])
    others = [open_folder(d, ref.model) for d in model_dirs[1:]]
    if spec is None:
        spec = ref.spec()
        log(f"spec: {len(spec.group_sizes)} groups, {spec.num_units} units, inferred on the meta device in "
            f"{time.perf_counter() - t:.1f} s")
    from ..permutation import identity_permutation

    perms = [identity_permutation(spec)]
    for i, other in enumerate(others, 1):
        t = time.perf_counter()
        stats: dict = {}
        a, b = ref.state(cache_bytes // 2), other.state(cache_bytes // 2)
        try:
            perm = stream_weight_matching(spec, a, b, seed=seed, max_iter=max_iter, restarts=restarts, stats=stats)
        except ValueError as e:  # name the folders, not the arguments
            raise CheckpointError(str(e).replace("state_a", model_dirs[0]).replace("state_b", model_dirs[i])) from e
        moved = units_moved(perm)
        log(f"weight matching {os.path.basename(os.path.normpath(model_dirs[i]))}: {moved} of {spec.num_rows} "
            f"units moved, {sum(stats.get('sweeps', []))} sweeps, {time.perf_counter() - t:.1f} s, "
            f"{(a.bytes_read + b.bytes_read) / 1e9:.1f} GB read")
        perms.append(perm)
        if out_dirs[i] is None:
            continue
        t = time.perf_counter()
        info = {"aligned_to": os.path.abspath(model_dirs[0]), "source": os.path.abspath(model_dirs[i]),
                "method": "weight", **(extra or {})}
        dst = write_permuted_folder(model_dirs[i], out_dirs[i], spec, perm, files=other.files, extra=info)
        log(f"wrote {dst} in {time.perf_counter() - t:.1f} s")
        if verify or (verify is None and other.files.nbytes <= VERIFY_MAX_BYTES):
            diff = verify_folder(model_dirs[i], dst, other.example_inputs(seed))
            log(f"check: the aligned copy computes what {model_dirs[i]} computes (relative output difference "
                f"{diff:.1e} in float32 copies of the stored weights)")
            if diff > 1e-4:
                import shutil

                shutil.rmtree(dst, ignore_errors=True)
                raise AlignmentCheckError(f"aligned {model_dirs[i]} differs from the original by {diff:.2e} in float32 "
                                          f"copies of the stored weights (tolerance 1e-04); removed "
                                   f"{dst} (a bug in the inferred spec: please report it)")
    return perms


def load_float32(folder: str) -> torch.nn.Module:
    """The model of ``folder`` with its weights, in float32 (bf16 and fp16 weights convert exactly)."""
    from ._model import meta_model

    from transformers.utils import logging

    cls = type(meta_model(folder))
    logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32)
    finally:
        logging.enable_progress_bar()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


@torch.no_grad()
def verify_folder(src: str, aligned: str, example_inputs) -> float:
    """Relative output difference of the models in ``src`` and ``aligned`` on ``example_inputs`` (float32)."""
    from ..check import relative_difference

    a = load_float32(src)
    out_a = a(*example_inputs)
    del a
    return relative_difference(out_a, load_float32(aligned)(*example_inputs))
