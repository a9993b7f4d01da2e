"""Checkpoints: load state dicts from safetensors or torch files, validate them, write them atomically.

Reading accepts what training scripts usually save:

- ``.safetensors`` files (``safetensors.torch.save_file``);
- torch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``; ``torch.load`` with ``weights_only=True``)
  holding a state dict, or a dict that wraps one under ``"state_dict"``, ``"model"``,
  ``"model_state_dict"`` or ``"module"`` (training checkpoints with an optimizer and an epoch);
- keys with a wrapper prefix on every key (``module.`` from DistributedDataParallel,
  ``_orig_mod.`` from ``torch.compile``, ``model.`` from Lightning), stripped when the model's
  own keys do not have it (and added when only the model's keys have it: a wrapped model).

Writing goes to a temporary file in the destination's folder, then ``os.replace``: a reader never
sees a half-written checkpoint, and a failed write leaves nothing behind. A destination that is
one of the inputs is refused.

>>> import os, tempfile, torch
>>> d = tempfile.mkdtemp()
>>> net = torch.nn.Linear(3, 2)
>>> torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
...            os.path.join(d, "a.pt"))
>>> sd = load_checkpoint(os.path.join(d, "a.pt"), reference=net.state_dict())
>>> sorted(sd)
['bias', 'weight']
>>> save_checkpoint(sd, os.path.join(d, "b.safetensors"))
>>> net.load_state_dict(load_checkpoint(os.path.join(d, "b.safetensors")), strict=True)
<All keys matched successfully>
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Mapping

import torch

__all__ = [
    "CheckpointError", "load_checkpoint", "read_state_dict", "unwrap_state_dict", "validate_state_dict",
    "save_checkpoint", "SAFETENSORS_SUFFIXES", "TORCH_SUFFIXES", "permutation_to_dict", "permutation_from_dict",
    "write_text",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_SHOW = 8  # offending keys named in an error message


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the model."""


# -- reading ----------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The raw contents of a checkpoint file: a dict (unwrapped by :func:`unwrap_state_dict`).

    The format comes from the suffix (``.safetensors``, else torch). Torch files are read with
    ``weights_only=True``: no code in the file runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "cannot read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first})") from e
    if isinstance(obj, torch.nn.Module):  # not reachable with weights_only, kept for clarity
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def unwrap_state_dict(obj: Mapping, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: follows ``state_dict``/``model``/... wrappers.

    A mapping whose values are all tensors is a state dict. Otherwise the first wrapper key
    (``WRAPPER_KEYS``) holding a mapping is followed, repeatedly.

    >>> w = torch.zeros(2)
    >>> unwrap_state_dict({"epoch": 1, "model": {"state_dict": {"w": w}}})["w"] is w
    True
    """
    seen = 0
    while True:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or seen > 4:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
            if not obj:
                raise CheckpointError(f"{where}: empty state dict")
            raise CheckpointError(
                f"{where}: not a state dict: {len(bad)} entries are not tensors ({_names(bad)}), and none of "
                f"{list(WRAPPER_KEYS)} wraps one")
        obj, seen = obj[inner], seen + 1


def _match_prefix(state: dict, reference: Iterable[str]) -> dict:
    """Drop (or add) a wrapper prefix carried by every key when that makes the keys match ``reference``.

    Stripping handles checkpoints of wrapped models (``module.``, ``_orig_mod.``, ``model.``, or
    several); adding handles a wrapped model (e.g. ``Logits(hf_model)``) reading a bare model's file.
    """
    ref = set(reference)
    for _ in range(3):  # nested wrappers: "module._orig_mod."
        keys = set(state)
        if keys <= ref or not keys:
            return state
        p = next((p for p in STRIP_PREFIXES if all(k.startswith(p) for k in keys)
                  and not all(k.startswith(p) for k in ref)), None)
        if p is None:
            break
        state = {k[len(p):]: v for k, v in state.items()}
    for p in STRIP_PREFIXES:
        if ref and all(k.startswith(p) for k in ref) and not any(k.startswith(p) for k in state):
            added = {p + k: v for k, v in state.items()}
            if set(added) <= ref:
                return added
    return state


def validate_state_dict(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                        where: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every missing key, unexpected key and shape mismatch.

    >>> ref = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    >>> try:
    ...     validate_state_dict({"w": torch.zeros(3, 2), "c": torch.zeros(1)}, ref, "b.pt")
    ... except CheckpointError as e:
    ...     for part in str(e).split("; "):
    ...         print(part)
    b.pt does not fit the model: 1 missing key (b)
    1 unexpected key (c)
    1 shape mismatch (w: (3, 2) in the checkpoint, (2, 3) in the model)
    """
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    shapes = [f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(reference[k].shape)} in the model"
              for k in reference if k in state and tuple(state[k].shape) != tuple(reference[k].shape)]
    problems = []
    if missing:
        problems.append(f"{_count(missing, 'missing key')} ({_names(missing)})")
    if unexpected:
        problems.append(f"{_count(unexpected, 'unexpected key')} ({_names(unexpected)})")
    if shapes:
        problems.append(f"{_count(shapes, 'shape mismatch', 'es')} ({_names(shapes, sep='; ')})")
    if problems:
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(problems))


def load_checkpoint(path: str | os.PathLike, reference: Mapping[str, torch.Tensor] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a checkpoint as a plain state dict; with ``reference`` (a model's state dict), validate it.

    Wrappers are unwrapped and, when a ``reference`` is given, a prefix such as ``module.`` that
    every key carries and the model's keys do not is stripped (or added, the other way round).
    Raises :class:`CheckpointError` naming the offending keys when the keys or shapes do not fit.
    """
    where = os.fspath(path)
    state = unwrap_state_dict(read_state_dict(path, map_location), where)
    if reference is not None:
        state = _match_prefix(state, reference.keys())
        validate_state_dict(state, reference, where)
        state = {k: state[k] for k in reference}  # the model's key order
    return state


# -- writing ----------------------------------------------------------------------------------
def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _for_safetensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, with tensors that share memory (tied weights) copied apart."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach().to("cpu").contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr is not None and (ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def save_checkpoint(state: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    inputs: Iterable[str | os.PathLike] = (), metadata: Mapping[str, str] | None = None,
                    overwrite: bool = True) -> None:
    """Write ``state`` to ``path`` atomically, as safetensors (by suffix) or a torch file.

    The file is written under a temporary name in the same folder, flushed to disk and renamed
    over ``path`` with ``os.replace``; on any error the temporary file is removed and ``path`` is
    untouched. ``path`` may not be one of ``inputs`` (compared after resolving links), and with
    ``overwrite=False`` may not exist. ``metadata`` (string pairs) goes into the safetensors header.

    Raises:
        CheckpointError: the destination is an input, exists (``overwrite=False``), or its folder
            does not exist; or ``state`` holds something other than tensors.
    """
    path = os.fspath(path)
    if not overwrite and os.path.exists(path):
        raise CheckpointError(f"refusing to write {path}: it exists")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"cannot write {path}: {_count(bad, 'entry', 'ies')} not tensors ({_names(bad)})")

    def write(tmp: str) -> None:
        if path.endswith(SAFETENSORS_SUFFIXES):
            from safetensors.torch import save_file

            save_file(_for_safetensors(state), tmp, metadata=dict(metadata or {}) or None)
        else:
            torch.save({k: v.detach() for k, v in state.items()}, tmp)

    _atomic_write(path, write, inputs)


def write_text(path: str | os.PathLike, text: str, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Write ``text`` to ``path`` atomically (temporary file + ``os.replace``), never over one of ``inputs``."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(os.fspath(path), write, inputs)


def _atomic_write(path: str, write, inputs) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then ``os.replace`` it over ``path``."""
    for src in inputs:
        if _same_file(path, os.fspath(src)):
            raise CheckpointError(f"refusing to write {path}: it is an input ({os.fspath(src)}); choose another path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- messages ---------------------------------------------------------------------------------
def _names(items, sep: str = ", ") -> str:
    items = list(items)
    shown = sep.join(str(i) for i in items[:_SHOW])
    return shown + (f"{sep}... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _count(items, noun: str, plural: str = "s") -> str:
    n = len(items)
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1] + plural if plural == 'ies' else noun + plural}"


# -- permutations and text ----------------------------------------------------------------------
PERMUTATION_FORMAT_VERSION = 3  # newest read and written; the oldest that holds the permutation is written


def permutation_to_dict(perm: Mapping[str, torch.Tensor]) -> dict:
    """JSON-ready form of a permutation: ``{"format": "autoperm.permutation", "version": 1, "groups": {name: [...]}}``.

    A group that is per block (a 2-d entry) is written as a list of rows, under version 2, with
    ``"per": {group: block group}`` when the permutation knows its blocks. A permutation that moves whole
    modules (``spec.modules``) is written under version 3 with ``"modules": [{"group", "local"}]``, which
    composition and inversion need.

    >>> d = permutation_to_dict({"h": torch.tensor([2, 0, 1])})
    >>> d["groups"], permutation_from_dict(d)["h"].tolist()
    ({'h': [2, 0, 1]}, [2, 0, 1])
    >>> d = permutation_to_dict({"h": torch.tensor([1, 0]), "d": torch.tensor([[1, 0], [0, 1]])})
    >>> d["version"], d["groups"]["d"], permutation_from_dict(d)["d"].shape
    (2, [[1, 0], [0, 1]], torch.Size([2, 2]))
    """
    groups = {n: torch.as_tensor(p).long().tolist() for n, p in perm.items()}
    rows = any(torch.as_tensor(p).dim() == 2 for p in perm.values())
    mods = getattr(perm, "modules", None)
    out = {"format": "autoperm.permutation", "version": 3 if mods else 2 if rows else 1, "groups": groups}
    if rows and getattr(perm, "per", None):
        out["per"] = dict(perm.per)
    if mods:
        out["modules"] = [{"group": a, "local": [list(f) for f in loc]} for a, loc in mods]
    return out


def permutation_from_dict(d: Mapping) -> dict[str, torch.Tensor]:
    """Inverse of :func:`permutation_to_dict` (checks the format tag and version)."""
    if d.get("format") != "autoperm.permutation":
        raise ValueError("not an autoperm permutation (missing format: autoperm.permutation)")
    if d.get("version") not in range(1, PERMUTATION_FORMAT_VERSION + 1):
        raise ValueError(f"unsupported permutation version {d.get('version')}; this autoperm reads 1 to "
                         f"{PERMUTATION_FORMAT_VERSION}")
    from .permutation import Permutation
    groups = {n: torch.tensor(p, dtype=torch.long) for n, p in d["groups"].items()}
    return Permutation(groups, per={g: h for g, h in d.get("per", {}).items() if g in groups},
                       modules=[(m["group"], tuple(tuple(f) for f in m.get("local", ()))) for m in d.get("modules", [])])

