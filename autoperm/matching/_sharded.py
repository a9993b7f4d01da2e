"""Weight matching over state dicts sharded by key across the ranks of a process group.

Each rank holds some of the keys (of A and the same keys of B). Every cost matrix of weight
matching is a sum over tensors, ``C_G = Σ_units A_G B_G^T``: each rank adds its own tensors'
terms, the matrix is all-reduced (float64), and every rank solves the same matrix, so every
decision of the descent (which assignment, whether it improves) is the same on all ranks; the
objective is summed the same way. A key held by several ranks counts once (its lowest rank's).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterator, Mapping

import torch

from .. import distributed
from ..spec import PermutationSpec
from ._costs import CostCache, _rows, check_states

__all__ = ["ShardedState", "ShardedCostCache", "shard_states"]


class ShardedState(Mapping):
    """One rank's view of a sharded state dict: its own tensors for the keys it owns (``local``),
    and for every other key of the spec a zero-stride placeholder with the key's shape, dtype and
    this rank's device (sizes for planning, no memory, never multiplied)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], local: set, placeholders: dict, group):
        self.tensors, self.local, self.placeholders, self.group = tensors, local, placeholders, group

    def __getitem__(self, key):
        return self.tensors[key] if key in self.local else self.placeholders[key]

    def __iter__(self) -> Iterator:
        return iter(self.placeholders)

    def __len__(self) -> int:
        return len(self.placeholders)

    def reduce_sum(self, value: float) -> float:
        """``value`` summed over the ranks."""
        return distributed.reduce_sum([value], self.group)[0]


class ShardedCostCache(CostCache):
    """:class:`CostCache` over this rank's tensors, each matrix all-reduced over the ranks (float64)."""

    def cost(self, name, units, perm) -> torch.Tensor:
        mine = [u for u in units if u.key in self.a.local]
        if mine:
            out = super().cost(name, mine, perm).to(torch.float64, copy=True)
        else:
            rows = _rows(units[0], self.a[units[0].key])
            out = torch.zeros(rows, rows, dtype=torch.float64, device=self.a[units[0].key].device)
        distributed.all_reduce_(out, self.a.group)
        return out


def shard_states(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 group) -> tuple[ShardedState, ShardedState]:
    """Check this rank's shards and agree with the other ranks on the whole; returns the two views.

    Raises ValueError, on every rank, when the ranks' specs differ, a key of the spec is held by
    no rank, or two ranks hold a key with different shapes or dtypes; and on this rank (like
    ``check_states``) when one of its tensors is bad or it holds a key of A without B's.
    """
    keys = [k for k in spec.axes if k in state_a or k in state_b]
    local_spec = SimpleNamespace(axes={k: spec.axes[k] for k in keys}, shapes=spec.shapes, expr_size=spec.expr_size)
    check_states(local_spec, state_a=state_a, state_b=state_b)
    device = next((state_a[k].device for k in keys), torch.device("cpu"))
    held = {k: (tuple(state_a[k].shape), str(state_a[k].dtype).removeprefix("torch.")) for k in keys}
    every = distributed.all_gather_object((distributed._digest([spec.to_json()]), held), group)
    if any(d != every[0][0] for d, _ in every):
        ranks = [r for r, (d, _) in enumerate(every) if d != every[0][0]]
        raise ValueError(f"the ranks do not hold the same spec: ranks {ranks} differ from rank 0")
    owner, meta = {}, {}
    for r, (_, table) in enumerate(every):
        for k, info in table.items():
            if k in meta and meta[k] != info:
                raise ValueError(f"{k!r} is {meta[k]} on rank {owner[k]} but {info} on rank {r}")
            owner.setdefault(k, r)
            meta[k] = info
    missing = [k for k in spec.axes if k not in meta]
    if missing:
        raise ValueError(f"no rank holds {missing[0]!r}" + (f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""))
    me = distributed.rank(group)
    local = {k for k in keys if owner[k] == me}
    placeholders = {k: torch.zeros((), dtype=getattr(torch, dtype), device=device).expand(shape)
                    for k, (shape, dtype) in meta.items()}
    return (ShardedState(state_a, local, placeholders, group), ShardedState(state_b, local, placeholders, group))
