"""Alignment on ``torch.distributed``: data-parallel statistics and sharded weight matching.

Every statistic autoperm gathers over data is a sum: of activations, their squares and cross
products, and counts (activation matching, REPAIR), of per-batch BatchNorm statistics weighted by
their batch counts (BN reset), of losses and hits (:func:`autoperm.barrier.evaluator`). Spread
over ranks, each rank streams its own shard of the data, the sums are all-reduced (in float64)
where each statistic is finalised, and every rank continues with the statistics of the whole
dataset. Weight matching's cost of a group is a sum over tensors too: with the state dicts
sharded by key, each rank adds its own tensors' products and the cost is all-reduced. Either
way every rank ends with the permutation a single process finds on the whole data, up to
float round-off in the order of the sums (a tie broken by round-off can fall either way, as it
can between two machines).

The public functions take ``group=``: None (the default) works alone, a process group
(``torch.distributed.group.WORLD`` for all ranks) spreads the work. Processes are started by
``torchrun``; :func:`init` joins them with the backend the device calls for (gloo on the CPU,
nccl on CUDA) and a timeout, so a rank that dies or stops answering turns into a
:class:`DistributedError` on the others instead of a hang::

    # torchrun --nproc_per_node=2 align.py
    from autoperm import distributed
    device = distributed.init(timeout=600)
    group = torch.distributed.group.WORLD
    perm = autoperm.activation_matching(spec, a, b, distributed.shard(batches, group), process_group=group)

Before any statistic is exchanged, :func:`check_same` compares a digest of the spec, the state
dicts' keys, shapes and dtypes, and a sample of their values across ranks: ranks holding
different models get a ValueError naming the ranks, on every rank.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import os
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

__all__ = ["init", "shard", "rank", "world_size", "all_reduce_", "reduce_sum", "broadcast_permutation", "barrier",
           "check_same", "all_gather_object", "DistributedError"]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, raised, or did not reach it within the group's timeout."""


def init(device: str | torch.device | None = None, timeout: float = 1800.0) -> torch.device:
    """Join the process group that ``torchrun`` set up (``env://``); returns this rank's device.

    The backend follows the device: nccl for CUDA (one device per local rank), gloo for the CPU.
    ``device`` None picks CUDA when it is available. ``timeout`` (seconds) bounds every collective:
    past it, the waiting ranks raise :class:`DistributedError`. Already initialised: nothing to do.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return device


def _active(group) -> bool:
    if group is None:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group= was given but torch.distributed is not initialised: call "
                         "autoperm.distributed.init() (under torchrun) or torch.distributed.init_process_group first")
    return True


def rank(group=None) -> int:
    """This process' rank in ``group`` (0 when ``group`` is None)."""
    return dist.get_rank(group) if _active(group) else 0


def world_size(group=None) -> int:
    """The number of ranks in ``group`` (1 when ``group`` is None)."""
    return dist.get_world_size(group) if _active(group) else 1


def shard(items: Iterable, group=None) -> Iterable:
    """This rank's share of ``items``: every ``world_size``-th item from its rank on (all of them alone).

    Rank 0 gets the first item, so statistics measured on the first batch only (the round-off
    estimate of activation matching) see the same batch as a single process would.

    >>> list(shard(range(5)))
    [0, 1, 2, 3, 4]
    """
    if not _active(group):
        return items
    return itertools.islice(items, rank(group), None, world_size(group))


def _device(group) -> torch.device:
    """Where the group's backend exchanges tensors: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _call(what: str, group, fn):
    try:
        return fn()
    except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
        raise DistributedError(f"{what} failed on rank {dist.get_rank(group)} of {dist.get_world_size(group)}: "
                               f"another rank died, raised, or did not reach it within the process group's "
                               f"timeout ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def all_reduce_(tensors: torch.Tensor | Sequence[torch.Tensor], group=None) -> None:
    """Sum each tensor over the ranks of ``group``, in place, in one float64 exchange (nothing alone).

    Every rank must pass tensors of the same shapes in the same order; the sums are taken in
    float64 whatever the tensors' dtype, then written back in it.
    """
    if not _active(group):
        return
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not tensors:
        return
    device = _device(group)
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    _call("all_reduce", group, lambda: dist.all_reduce(flat, group=group))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()


def reduce_sum(values: Sequence[float], group=None) -> list[float]:
    """The sums over the ranks of ``group`` of a list of numbers (float64; the list itself alone)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_(t, group)
    return t.tolist()


def broadcast_permutation(perm: Mapping[str, torch.Tensor], group=None, src: int = 0) -> dict:
    """Rank ``src``'s permutation on every rank of ``group`` (CPU LongTensors; a copy of ``perm`` alone).

    Every rank must hold a permutation of the same groups and sizes (the spec is checked by
    :func:`check_same` before)."""
    names = sorted(perm)
    if not _active(group) or not names:
        return {g: perm[g].cpu() for g in names}
    flat = torch.cat([perm[g].reshape(-1).long().cpu() for g in names]).to(_device(group))
    _call("broadcast of the permutation", group,
          lambda: dist.broadcast(flat, group=group, group_src=src))
    out, offset = {}, 0
    for g in names:
        n = perm[g].numel()
        out[g] = flat[offset:offset + n].cpu().clone().reshape(perm[g].shape)
        offset += n
    return out


def barrier(group=None, timeout: float | None = None) -> None:
    """Wait for every rank of ``group``, at most ``timeout`` seconds (default: the group's own).

    On gloo, a monitored barrier: the error names the ranks that did not arrive."""
    if not _active(group):
        return
    if dist.get_backend(group) == "gloo":
        kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        _call("barrier", group, lambda: dist.monitored_barrier(group, wait_all_ranks=True, **kw))
    else:
        _call("barrier", group, lambda: dist.barrier(group))


def all_gather_object(obj, group=None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` alone)."""
    if not _active(group):
        return [obj]
    out = [None] * world_size(group)
    _call("all_gather_object", group, lambda: dist.all_gather_object(out, obj, group=group))
    return out


def _digest(parts: Iterable) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
    return h.hexdigest()[:16]


def _sample(t: torch.Tensor) -> bytes:
    """Up to 256 evenly spaced elements of ``t``, as float64 bytes: a cheap fingerprint of its values."""
    flat = t.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    step = max(1, flat.numel() // 256)
    return flat[::step][:256].to("cpu", torch.float64).numpy().tobytes()


def check_same(group=None, spec=None, values: bool = True, **states: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError on every rank of ``group`` unless all ranks hold the same spec and states.

    Compared across ranks: a digest of ``spec.to_json()``; of each state's keys, shapes and dtypes;
    and, with ``values``, of a sample of each tensor's values (up to 256 elements; two models with
    different weights differ there). The message names the ranks that differ from rank 0 and
    what differs. Alone, nothing to compare.
    """
    if not _active(group):
        return
    mine = {}
    if spec is not None:
        mine["spec"] = _digest([spec.to_json()])
    for name, state in states.items():
        items = [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)]
        mine[f"{name} keys, shapes and dtypes"] = _digest((k, tuple(v.shape), str(v.dtype)) for k, v in items)
        if values:
            mine[f"{name} values"] = _digest(b"".join((k.encode(), _sample(v))) for k, v in items)
    every = all_gather_object(mine, group)
    bad = {r: [k for k in mine if d.get(k) != every[0].get(k)] for r, d in enumerate(every)}
    bad = {r: ks for r, ks in bad.items() if ks}
    if bad:
        what = "; ".join(f"rank {r}: {', '.join(ks)}" for r, ks in bad.items())
        raise ValueError(f"the ranks do not hold the same model: differs from rank 0 in {what}")
