"""Groups that are independent per block (the wreath product): checking a spec, and gather indices.

A group ``d`` declared ``per`` a block group ``h`` takes one permutation per block of ``h``:
``perm[d]`` has shape ``[size(h), size(d)]``. At a position whose ``h`` coordinate (in the new,
permuted tensor) is ``i``, the ``d`` coordinate ``j`` reads the old coordinate ``perm[d][i][j]``,
while ``h`` itself reads ``perm[h][i]``: ``new[(i, j)] = old[(perm[h][i], perm[d][i][j])]``.

The block coordinate comes from an enclosing product of the same axis that has ``h`` as a direct
part (heads × head dim), or else from the one other axis of the tensor that carries ``h`` (fused
expert weights ``[E, I, H]`` whose ``I`` is per expert).
"""
from __future__ import annotations

import torch

from .spec import expr_size, walk_groups

__all__ = ["check_per", "expr_size", "old_coords", "coords_of", "uncovered", "block_axis"]


def _flat(expr) -> list:
    """Parts of a product with nested products spliced in (a nested row-major product is one product)."""
    return [x for e in expr["prod"] for x in (_flat(e) if e and "prod" in e else [e])]


def old_coords(expr, pos: torch.Tensor, env: dict, perm, per: dict, sizes) -> torch.Tensor:
    """Old index along an axis for new indices ``pos``; ``env`` gives block coordinates at those positions."""
    if "g" in expr:
        g = expr["g"]
        p = torch.as_tensor(perm[g]).long().cpu()
        if g in per:
            return p[env[per[g]], pos]
        return p[pos]
    if "fixed" in expr:
        return pos
    parts = next(iter(expr.values()))
    if "cat" in expr:
        out, off = pos.clone(), 0
        for e in parts:
            n = expr_size(e, sizes)
            m = (pos >= off) & (pos < off + n)
            out[m] = old_coords(e, pos[m] - off, {k: v[m] for k, v in env.items()}, perm, per, sizes) + off
            off += n
        return out
    parts = _flat(expr)
    ns = [expr_size(e, sizes) for e in parts]
    strides = [1] * len(ns)
    for k in range(len(ns) - 2, -1, -1):
        strides[k] = strides[k + 1] * ns[k + 1]
    cs = [(pos // st) % n for st, n in zip(strides, ns)]
    env = dict(env)
    env.update({e["g"]: c for e, c in zip(parts, cs) if "g" in e})
    out = torch.zeros_like(pos)
    for e, c, st in zip(parts, cs, strides):
        out = out + old_coords(e, c, env, perm, per, sizes) * st
    return out


def coords_of(expr, group: str, sizes) -> torch.Tensor:
    """Coordinate of ``group`` at every index of an axis (-1 where the group does not act)."""
    n = expr_size(expr, sizes)
    pos = torch.arange(n)
    return _coords(expr, pos, group, sizes)


def _coords(expr, pos, group, sizes):
    if "g" in expr:
        return pos.clone() if expr["g"] == group else torch.full_like(pos, -1)
    if "fixed" in expr:
        return torch.full_like(pos, -1)
    parts = next(iter(expr.values()))
    out = torch.full_like(pos, -1)
    if "cat" in expr:
        off = 0
        for e in parts:
            n = expr_size(e, sizes)
            m = (pos >= off) & (pos < off + n)
            out[m] = _coords(e, pos[m] - off, group, sizes)
            off += n
        return out
    ns = [expr_size(e, sizes) for e in parts]
    st = 1
    for e, n in reversed(list(zip(parts, ns))):
        c = _coords(e, (pos // st) % n, group, sizes)
        out = torch.where(c >= 0, c, out)
        st *= n
    return out


def uncovered(expr, per: dict, covered=frozenset()) -> list[str]:
    """Per-block groups in ``expr`` with an occurrence whose block group is not a direct part of an enclosing product."""
    if not expr or "fixed" in expr:
        return []
    if "g" in expr:
        g = expr["g"]
        return [g] if g in per and per[g] not in covered else []
    parts = next(iter(expr.values()))
    if "prod" in expr:
        parts = _flat(expr)
        covered = covered | {e["g"] for e in parts if "g" in e}
    return list(dict.fromkeys(g for e in parts for g in uncovered(e, per, covered)))


def block_axis(exprs: list, axis: int, block: str) -> int | None:
    """The one other axis of a tensor that carries ``block`` (None if there is not exactly one)."""
    hits = [i for i, e in enumerate(exprs) if i != axis and block in walk_groups(e)]
    return hits[0] if len(hits) == 1 else None


def check_per(spec) -> None:
    """Raise ValueError (naming the group or key) if the spec's per-block declarations cannot be applied."""
    for d, h in spec.per.items():
        if d not in spec.group_sizes or h not in spec.group_sizes:
            raise ValueError(f"group {d!r} is declared per {h!r}, but the spec has no group "
                             f"{d if d not in spec.group_sizes else h!r}")
        if h == d or h in spec.per:
            raise ValueError(f"group {d!r} is per {h!r}, which is itself per block (nesting is not supported)")
    for key, exprs in spec.axes.items():
        for i, e in enumerate(exprs):
            for d in uncovered(e, spec.per):
                b = block_axis(exprs, i, spec.per[d])
                if b is None or d in walk_groups(exprs[b]) or walk_groups(exprs[b]).count(spec.per[d]) != 1:
                    raise ValueError(f"{key}:{i} carries group {d!r} (per {spec.per[d]!r}) but no single other "
                                     f"axis of {key} gives its block")
                if (coords_of(exprs[b], spec.per[d], spec.group_sizes) < 0).any():
                    raise ValueError(f"{key}:{b} does not carry block group {spec.per[d]!r} at every index")
            others = {spec.per[d] for d in uncovered(e, spec.per)}
            if len({block_axis(exprs, i, h) for h in others}) > 1:
                raise ValueError(f"{key}:{i}: its per-block groups take their blocks from different axes")
