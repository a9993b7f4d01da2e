"""Write a permuted copy of a transformers folder, one shard and one tensor at a time, atomically.

The copy has the source's layout: the same shard files (same names, same safetensors headers: a
permutation changes no shape, dtype or byte range, so each header is copied as it is and every
tensor is written at its own offset), the same index, config, tokenizer and other files, plus
``autoperm_permutation.json``. Everything is written into a hidden folder beside the destination,
``.<name>.autoperm-partial``; each shard goes to ``<shard>.tmp`` there, is flushed to disk and
renamed when complete, and a progress file records the finished shards with a fingerprint of the
source files and the permutation. Only when every file is written is the folder renamed into
place. An interrupted run therefore leaves the destination as it was; re-running with the same
source and permutation resumes after the last finished shard, anything else starts clean.

Memory: the largest tensor, twice (read, then permuted), per tensor written (``.bin`` shards: one
shard).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from ..io import CheckpointError, permutation_to_dict
from ..permutation import permute_tensor, validate_permutation
from ._files import WeightFiles

__all__ = ["write_permuted_folder", "PERMUTATION_FILE"]

PERMUTATION_FILE = "autoperm_permutation.json"
_PROGRESS = ".autoperm-progress.json"


def _fingerprint(files: WeightFiles, perm) -> str:
    h = hashlib.sha256(json.dumps(permutation_to_dict(perm), sort_keys=True).encode())
    for name in files.files:
        st = os.stat(os.path.join(files.folder, name))
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _permuted(spec, perm, key: str, t: torch.Tensor) -> torch.Tensor:
    return permute_tensor(spec, perm, key, t) if key in spec.axes else t


def _sync_write(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(files: WeightFiles, name: str, out_path: str, spec, perm, on_tensor=None) -> None:
    infos = sorted(((k, i) for k, i in files.infos.items() if i.file == name), key=lambda kv: kv[1].start)

    def write(f):
        f.write(files.headers[name])
        for key, info in infos:
            f.seek(info.start)
            t = _permuted(spec, perm, key, files.read(key)).contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
            if on_tensor is not None:
                on_tensor(name, key)

    _sync_write(out_path, write)


def _write_bin(files: WeightFiles, name: str, out_path: str, spec, perm, on_tensor=None) -> None:
    keys = [k for k, i in files.infos.items() if i.file == name]
    out = {}
    for k in keys:
        out[k] = _permuted(spec, perm, k, files.read(k)).contiguous()
        if on_tensor is not None:
            on_tensor(name, k)
    _sync_write(out_path, lambda f: torch.save(out, f))


def write_permuted_folder(src: str, dst: str, spec, perm, *, files: WeightFiles | None = None,
                          extra: dict | None = None, overwrite: bool = True, on_tensor=None) -> str:
    """Write ``src`` with ``perm`` applied to every axis ``spec`` permutes into the folder ``dst``.

    Args:
        src: the source folder (its weight files must hold every key ``spec`` permutes, or be tied
            to one that they hold).
        dst: the destination; never ``src`` or inside it. An existing ``dst`` is replaced (once the
            new copy is complete) unless ``overwrite`` is False.
        spec, perm: the spec and the permutation to apply.
        files: ``src``'s :class:`WeightFiles`, if already open.
        extra: more fields for ``autoperm_permutation.json`` (the source, the reference, ...).
        on_tensor: called as ``on_tensor(file, key)`` after each tensor is written (progress; tests).

    Returns:
        ``dst``.

    >>> import os, tempfile, json, torch, autoperm
    >>> from safetensors.torch import save_file, load_file
    >>> d = tempfile.mkdtemp(); src = os.path.join(d, "src")
    >>> os.mkdir(src); _ = open(os.path.join(src, "config.json"), "w").write("{}")
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> save_file(mlp.state_dict(), os.path.join(src, "model.safetensors"))
    >>> spec = autoperm.infer_spec(mlp, torch.randn(1, 4)); perm = autoperm.random_permutation(spec, 1)
    >>> out = write_permuted_folder(src, os.path.join(d, "out"), spec, perm)
    >>> new = load_file(os.path.join(out, "model.safetensors"))
    >>> all(torch.equal(new[k], v) for k, v in autoperm.apply_permutation(spec, perm, mlp.state_dict()).items())
    True
    >>> sorted(os.listdir(out))
    ['autoperm_permutation.json', 'config.json', 'model.safetensors']
    """
    from ..plugins.mergekit import _inside

    if getattr(spec, "modules", None):
        raise NotImplementedError("folders are written one tensor at a time, which cannot move whole modules "
                                  "(experts in a ModuleList): apply the permutation in memory (apply_permutation)")
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if _inside(dst, src) or _inside(src, dst):
        raise CheckpointError(f"refusing to write {dst}: it is, or holds, the input folder {src}")
    if not overwrite and os.path.exists(dst):
        raise CheckpointError(f"refusing to write {dst}: it exists")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise CheckpointError(f"refusing to write {dst}: it exists and is not a folder")
    validate_permutation(spec, perm)
    files = files or WeightFiles(src)
    parent, name = os.path.split(dst)
    if not os.path.isdir(parent):
        raise CheckpointError(f"cannot write {dst}: folder {parent} does not exist")
    part = os.path.join(parent, f".{name}.autoperm-partial")
    stamp = _fingerprint(files, perm)
    done = _resume(part, stamp)
    os.makedirs(part, exist_ok=True)
    write = _write_safetensors if files.kind == "safetensors" else _write_bin
    for shard in files.files:
        if shard in done:
            continue
        tmp = os.path.join(part, shard + ".tmp")
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        write(files, shard, tmp, spec, perm, on_tensor)
        os.replace(tmp, os.path.join(part, shard))
        done.append(shard)
        _save_progress(part, stamp, done)
    for entry in os.listdir(src):  # config, index, tokenizer, generation config, ...
        path = os.path.join(src, entry)
        if os.path.isfile(path) and entry not in files.files and entry != PERMUTATION_FILE:
            shutil.copy2(path, os.path.join(part, entry))
    record = {**permutation_to_dict(perm), **(extra or {})}
    with open(os.path.join(part, PERMUTATION_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.unlink(os.path.join(part, _PROGRESS))
    _swap_into_place(part, dst)
    return dst


def _resume(part: str, stamp: str) -> list:
    """The shards a previous run of the same job finished in ``part``; anything else there is removed."""
    if not os.path.isdir(part):
        return []
    try:
        with open(os.path.join(part, _PROGRESS), encoding="utf-8") as f:
            progress = json.load(f)
    except (OSError, ValueError):
        progress = {}
    if progress.get("fingerprint") != stamp:
        shutil.rmtree(part)
        return []
    done = [s for s in progress.get("done", []) if os.path.isfile(os.path.join(part, s))]
    for root, _, names in os.walk(part):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), part)
            if rel not in done and rel != _PROGRESS:
                os.unlink(os.path.join(root, n))
    return done


def _save_progress(part: str, stamp: str, done: list) -> None:
    tmp = os.path.join(part, _PROGRESS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"fingerprint": stamp, "done": done}, f)
    os.replace(tmp, os.path.join(part, _PROGRESS))


def _swap_into_place(part: str, dst: str) -> None:
    """Rename the finished folder ``part`` to ``dst``; an existing ``dst`` is moved aside first, then removed."""
    if not os.path.exists(dst):
        os.replace(part, dst)
        return
    parent, name = os.path.split(dst)
    old = os.path.join(parent, f".{name}.autoperm-old")
    if os.path.exists(old):
        shutil.rmtree(old)
    os.replace(dst, old)
    os.replace(part, dst)
    shutil.rmtree(old, ignore_errors=True)
