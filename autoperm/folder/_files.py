"""The weight files of a transformers folder, read one tensor at a time.

A folder holds ``model.safetensors``, or shards named by ``model.safetensors.index.json``, or
(without safetensors) ``pytorch_model.bin`` and its index. A safetensors file is an 8-byte header
length, a JSON header (dtype, shape and byte range of every tensor) and the data; the header alone
gives every key, shape and dtype, so a folder is checked against its model before any data is read.
A tensor is read with one ``readinto`` straight into a tensor of its stored dtype (bf16 stays bf16),
so reading costs its own size and nothing else: no file stays mapped (mapped pages count as
resident memory until unmapped), no shard is loaded whole. ``.bin`` shards are opened with
``torch.load(mmap=True)``.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from ..io import CheckpointError

__all__ = ["TensorInfo", "WeightFiles", "LazyState", "DTYPES", "SAFE_INDEX", "BIN_INDEX"]

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_CHUNK = 1 << 30  # bytes per read call (one read(2) returns at most ~2 GiB)


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives: its file (a name inside the folder), shape, dtype and byte range."""

    file: str
    shape: tuple
    dtype: torch.dtype
    start: int  # absolute byte offset in the file (safetensors), -1 for .bin
    nbytes: int


def _read_header(path: str) -> tuple[bytes, dict]:
    """The raw header bytes (length prefix included) and the parsed header of a safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit the file)")
        raw = f.read(n)
    try:
        return head + raw, json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from e


def safetensors_layout(path: str, name: str) -> tuple[bytes, dict[str, TensorInfo]]:
    """The header bytes and ``{key: TensorInfo}`` of one safetensors file, checked against its size."""
    raw, header = _read_header(path)
    base, size = len(raw), os.path.getsize(path)
    out = {}
    for key, h in header.items():
        if key == "__metadata__":
            continue
        dtype = DTYPES.get(h.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: {key} has dtype {h.get('dtype')!r}, which autoperm cannot read")
        shape, (s, e) = tuple(h["shape"]), h["data_offsets"]
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if e - s != want:
            raise CheckpointError(f"{path}: {key} holds {e - s} bytes, its shape {shape} needs {want}")
        if base + e > size:
            raise CheckpointError(f"{path}: {key} ends at byte {base + e}, past the end of the file ({size} bytes): "
                                  "the file is truncated")
        out[key] = TensorInfo(name, shape, dtype, base + s, e - s)
    return raw, out


class WeightFiles:
    """Every tensor of a folder's weight files: ``infos[key]`` without reading data, ``read(key)`` one tensor.

    Raises :class:`CheckpointError` naming the file (and key) for a missing shard, an index naming
    a file that is not there, or a file that is not what its name says.
    """

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        self.infos: dict[str, TensorInfo] = {}
        self.headers: dict[str, bytes] = {}  # safetensors file -> raw header
        self.kind = "safetensors"
        self._open: dict = {}
        self._bins: dict = {}
        files = self._files()
        for name, keys in files.items():
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                shown = f" (holds {keys[0]}{' and more' if len(keys) > 1 else ''})" if keys else ""
                raise CheckpointError(f"{path}: missing; the index names it{shown}")
            if self.kind == "safetensors":
                raw, infos = safetensors_layout(path, name)
                self.headers[name] = raw
            else:
                infos = {k: TensorInfo(name, tuple(t.shape), t.dtype, -1, t.numel() * t.element_size())
                         for k, t in self._bin(name).items()}
            for k in keys:
                if k not in infos:
                    raise CheckpointError(f"{path}: has no tensor {k}, which the index places there")
            for k, info in infos.items():
                if k in self.infos:
                    raise CheckpointError(f"{path}: {k} is also in {self.infos[k].file}")
                self.infos[k] = info

    def _files(self) -> dict[str, list]:
        """``{file name: [keys the index places there]}`` in the index's order (shards sorted by name)."""
        for index, single, kind in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
            path = os.path.join(self.folder, index)
            if os.path.isfile(path):
                self.kind = kind
                try:
                    with open(path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{path}: not a weight index (no weight_map: {e})") from e
                out: dict = {}
                for k, name in weight_map.items():
                    out.setdefault(name, []).append(k)
                return dict(sorted(out.items()))
            if os.path.isfile(os.path.join(self.folder, single)):
                self.kind = kind
                return {single: []}
        if not os.path.isdir(self.folder):
            raise CheckpointError(f"{self.folder}: no such folder")
        raise CheckpointError(f"{self.folder}: no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")

    def _bin(self, name: str) -> dict:
        if name not in self._bins:
            from ..io import unwrap_state_dict

            path = os.path.join(self.folder, name)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds here; all mean "cannot read"
                raise CheckpointError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0]})") from e
            self._bins[name] = unwrap_state_dict(obj, path)
        return self._bins[name]

    @property
    def files(self) -> list[str]:
        """The weight files, in order."""
        return list(dict.fromkeys(i.file for i in self.infos.values()))

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def read(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``key``'s tensor (rows ``start:stop`` of its first axis), freshly read, in its stored dtype."""
        info = self.infos[key]
        if info.start < 0:
            t = self._bin(info.file)[key]
            return t if start == 0 and stop is None else t[start:stop]
        rows = info.shape[0] if info.shape else 1
        stop = rows if stop is None else min(stop, rows)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        t = torch.empty(shape, dtype=info.dtype)
        nbytes = t.numel() * t.element_size()
        if not nbytes:
            return t
        f = self._open.get(info.file)
        if f is None:
            f = self._open[info.file] = open(os.path.join(self.folder, info.file), "rb", buffering=0)  # noqa: SIM115
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        done = 0
        f.seek(info.start + start * (info.nbytes // rows))
        while done < nbytes:
            n = f.readinto(view[done:done + _CHUNK])
            if not n:
                raise CheckpointError(f"{os.path.join(self.folder, info.file)}: {key} is cut short "
                                      "(the file is truncated)")
            done += n
        return t

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
        self._bins.clear()


class LazyState(Mapping):
    """A read-only state dict over :class:`WeightFiles`: a tensor is read when first asked for and kept
    in a least-recently-used cache of at most ``cache_bytes`` (tensors larger than the cache are not kept).

    ``aliases`` maps keys the files do not hold (tied weights: ``lm_head.weight``) to keys they do.

    >>> import os, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> d = tempfile.mkdtemp()
    >>> save_file({"w": torch.arange(6.0).reshape(2, 3).bfloat16()}, os.path.join(d, "model.safetensors"))
    >>> s = LazyState(WeightFiles(d), aliases={"v": "w"})
    >>> sorted(s), s["v"].dtype, s["w"][1].tolist()
    (['v', 'w'], torch.bfloat16, [3.0, 4.0, 5.0])
    """

    def __init__(self, files: WeightFiles, aliases: Mapping[str, str] | None = None, cache_bytes: int = 1 << 30):
        self.files, self.aliases, self.cache_bytes = files, dict(aliases or {}), cache_bytes
        self._cache: OrderedDict = OrderedDict()
        self._held = 0
        self.reads = 0  # tensors read from disk (for measurements)
        self.bytes_read = 0

    def source(self, key: str) -> str:
        """The key that holds ``key``'s data in the files."""
        return self.aliases.get(key, key)

    def info(self, key: str) -> TensorInfo:
        return self.files.infos[self.source(key)]

    def __getitem__(self, key: str) -> torch.Tensor:
        src = self.source(key)
        if src not in self.files.infos:
            raise KeyError(key)
        t = self._cache.get(src)
        if t is not None:
            self._cache.move_to_end(src)
            return t
        t = self.files.read(src)
        self.reads += 1
        n = self.files.infos[src].nbytes
        self.bytes_read += n
        if n <= self.cache_bytes:
            while self._cache and self._held + n > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._held -= old.numel() * old.element_size()
            self._cache[src] = t
            self._held += n
        return t

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``key``'s tensor: from the cache if it is there, else read alone (not cached)."""
        src = self.source(key)
        t = self._cache.get(src)
        if t is not None:
            return t[start:stop]
        t = self.files.read(src, start, stop)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def __iter__(self) -> Iterator[str]:
        yield from self.files.infos
        yield from (k for k in self.aliases if k not in self.files.infos)

    def __len__(self) -> int:
        return len(self.files.infos) + sum(k not in self.files.infos for k in self.aliases)

    def __contains__(self, key) -> bool:
        return self.source(key) in self.files.infos

    def clear(self) -> None:
        self._cache.clear()
        self._held = 0
