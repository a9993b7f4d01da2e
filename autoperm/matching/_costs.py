"""Per-group cost matrices built from a spec's axis expressions (the engine of weight matching).

A group G may act on a whole axis (``{"g": G}``), on a slice of it (inside ``cat``), or as one
factor of it (inside ``prod``: heads × head dim, blocks of a grouped conv, channel × spatial).
Every position of an axis has a coordinate on each leaf of its expression (-1 where the leaf
does not reach). For each place G acts, the positions where G has a coordinate are laid out in
a *table* ``[|G|, m]``: row i holds the positions whose G-coordinate is i, and column r lines up
positions that agree on every other coordinate. Gathering a tensor through the table and moving
that axis first gives a matrix ``[|G|, rest]``, with the same column order for model A and
model B. With every other permutation applied to B (the one being solved held at the identity),

    C_G[i, j] = Σ_units <A_G[i], B_G[j]>,   objective(P_G) = Σ_i C_G[i, p_G(i)],

so the best P_G with the others fixed is one linear assignment on C_G. A *unit* is one place a
group acts: one (tensor, axis), or one leaf when G meets itself inside a product on that axis
(then the other leaf is held at G's current permutation: a linearisation, as for a group on two
axes of one tensor).

A *pair* is a product of exactly two groups G × H on some positions (heads × head dim, blocks ×
within-block). Its table is ``[|G|, |H|, m]`` and its matrix ``[|G|·|H|, rest]`` keeps both
coordinates, so the block-structured step of weight matching can solve G and H together.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from ..spec import PermutationSpec, walk_groups

__all__ = ["Unit", "Pair", "Layout", "build_layout", "check_states", "gather_b", "gather_a", "leaf_index",
           "objective"]


@dataclass
class Unit:
    """Where ``group`` acts: ``key``'s ``axis``, its leaves ``own`` (held at the identity on the B side)."""

    key: str
    axis: int
    group: str
    own: frozenset  # leaf ids (DFS order over the leaves of the axis' expression)
    table: torch.Tensor | None  # [|G|, m] or, for a pair, [|G|, |H|, m] positions; None: the whole axis in order
    deps: frozenset  # groups whose permutation changes the B-side matrix
    alone: bool  # no other group leaf on the unit's axis (its B-side index there is the table alone)
    partner: str | None = None  # a pair's second group H


@dataclass
class Layout:
    """Everything weight matching precomputes from a spec."""

    units: dict  # group -> [Unit] (every place it acts)
    pairs: dict  # group G -> ([Unit] of its unpaired places, [Unit] pairs G × H with |G| <= |H|)
    deps: dict  # group -> tuple of groups whose change alters its cost


def check_states(spec: PermutationSpec, **states: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the key unless every state has every key of ``spec.axes`` with the
    spec's shape, and the tensors that carry a group are floating point and finite."""
    for name, state in states.items():
        for key, exprs in spec.axes.items():
            if key not in state:
                raise ValueError(f"{name} has no key {key!r} that the spec permutes")
            t = state[key]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}[{key!r}] is not a tensor ({type(t).__name__})")
            want = spec.shapes.get(key)
            if t.dim() != len(exprs) or (want is not None and list(t.shape) != list(want)):
                raise ValueError(f"{name}[{key!r}] has shape {tuple(t.shape)}, the spec expects "
                                 f"{tuple(want) if want is not None else f'{len(exprs)} axes'}")
            for axis, e in enumerate(exprs):
                if e is not None and t.shape[axis] != spec.expr_size(e):
                    raise ValueError(f"{name}[{key!r}] axis {axis} has size {t.shape[axis]}, "
                                     f"the spec expects {spec.expr_size(e)}")
            if not any(exprs):
                continue
            if not t.is_floating_point():
                raise ValueError(f"{name}[{key!r}] must be floating point, got {t.dtype}")
            # one float64 sum is much cheaper than isfinite over every element; it is not finite
            # exactly when some element is not (float64 cannot overflow on float32/16 inputs)
            if t.numel() and not math.isfinite(float(t.sum(dtype=torch.float64))):
                raise ValueError(f"{name}[{key!r}] has NaN or infinite values")
    names = list(states)
    for other in names[1:]:
        for key in spec.axes:
            a, b = states[names[0]][key], states[other][key]
            if a.shape != b.shape:
                raise ValueError(f"{key!r} has shape {tuple(a.shape)} in {names[0]}, {tuple(b.shape)} in {other}")


# -- coordinates and tables ------------------------------------------------------------------------
def _coords(spec: PermutationSpec, expr) -> tuple[int, list]:
    """``(n, [(group or None, coordinate vector of length n)])`` for the leaves of ``expr`` in DFS order."""
    if "g" in expr or "fixed" in expr:
        n = spec.expr_size(expr)
        return n, [(expr.get("g"), torch.arange(n))]
    parts = [_coords(spec, e) for e in next(iter(expr.values()))]
    sizes = [n for n, _ in parts]
    total = sum(sizes) if "cat" in expr else math.prod(sizes)
    out = []
    for i, (n, leaves) in enumerate(parts):
        for g, v in leaves:
            if "cat" in expr:
                full = torch.full((total,), -1, dtype=torch.long)
                full[sum(sizes[:i]):sum(sizes[:i]) + n] = v
            else:
                full = v.repeat_interleave(math.prod(sizes[i + 1:])).repeat(math.prod(sizes[:i]))
            out.append((g, full))
    return total, out


def _grid(coords: torch.Tensor, lead: list) -> torch.Tensor:
    """Positions where every ``lead`` leaf has a coordinate, as ``[|lead_0|, |lead_1|, ..., m]``:
    columns line up positions that agree on every other leaf."""
    rows = torch.nonzero((coords[:, lead] >= 0).all(1)).reshape(-1)
    sub = coords[rows].numpy()
    others = [c for c in range(coords.shape[1]) if c not in lead]
    order = np.lexsort([sub[:, c] for c in reversed(lead)] + [sub[:, c] for c in reversed(others)])
    sizes = [int(sub[:, c].max()) + 1 for c in lead]
    grid = rows[torch.from_numpy(order)].reshape(-1, *sizes)
    return grid.permute(*range(1, len(lead) + 1), 0).contiguous()


def build_layout(spec: PermutationSpec, device=None) -> Layout:
    """Units, pairs and dependencies of every group of ``spec`` (tables on ``device``)."""
    units: dict = {g: [] for g in spec.group_sizes}
    unpaired: dict = {g: [] for g in spec.group_sizes}
    pairs: dict = {g: [] for g in spec.group_sizes}
    for key, exprs in spec.axes.items():
        info = []
        for e in exprs:
            if e is None:
                info.append((None, []))
                continue
            n, leaves = _coords(spec, e)
            info.append((torch.stack([v for _, v in leaves], 1), [g for g, _ in leaves]))
        all_groups = [(axis, leaf, g) for axis, (_, gs) in enumerate(info) for leaf, g in enumerate(gs) if g]
        for axis, (coords, gs) in enumerate(info):
            if coords is None:
                continue
            n_axis = len(coords)

            def unit(g, own, table, partner=None):
                deps = frozenset(h for a, leaf, h in all_groups if a != axis or leaf not in own)
                if table is not None and table.dim() == 2 and table.shape[1] == 1 and len(table) == n_axis \
                        and torch.equal(table[:, 0], torch.arange(n_axis)):
                    table = None
                alone = all(leaf in own for leaf, x in enumerate(gs) if x)
                return Unit(key, axis, g, frozenset(own), None if table is None else table.to(device), deps, alone,
                            partner)

            for g in dict.fromkeys(x for x in gs if x):
                mine = [leaf for leaf, x in enumerate(gs) if x == g]
                overlap = bool(((coords[:, mine] >= 0).sum(1) > 1).any())
                chunks = [[leaf] for leaf in mine] if overlap else [mine]
                for chunk in chunks:
                    units[g].append(unit(g, chunk, torch.cat([_grid(coords, [leaf]) for leaf in chunk], 1)))
                # pairs: G's leaf shares its positions with exactly one other group leaf, which covers them all
                plain = []
                for leaf in mine:
                    here = coords[:, leaf] >= 0
                    mates = [o for o, x in enumerate(gs) if x and o != leaf and bool((coords[here, o] >= 0).any())]
                    if len(mates) == 1 and gs[mates[0]] != g and bool((coords[here, mates[0]] >= 0).all()) \
                            and not overlap and (spec.group_sizes[g], g) <= (spec.group_sizes[gs[mates[0]]], gs[mates[0]]):
                        pairs[g].append(unit(g, [leaf, mates[0]], _grid(coords, [leaf, mates[0]]), gs[mates[0]]))
                    else:
                        plain.append(leaf)
                if plain and pairs[g]:
                    unpaired[g].extend(
                        [unit(g, [leaf], _grid(coords, [leaf])) for leaf in plain] if overlap
                        else [unit(g, plain, torch.cat([_grid(coords, [leaf]) for leaf in plain], 1))])
                elif plain:
                    unpaired[g].extend(units[g][-len(chunks):])
    deps = {}
    for g in spec.group_sizes:
        d = set().union(*(u.deps for u in units[g]))
        if pairs[g]:
            d |= set().union(*(u.deps for u in pairs[g] + unpaired[g])) | {u.partner for u in pairs[g]}
        deps[g] = tuple(sorted(d))
    return Layout(units, {g: (unpaired[g], pairs[g]) for g in spec.group_sizes if pairs[g]}, deps)


def leaf_index(spec: PermutationSpec, expr, perm: Mapping[str, torch.Tensor], own=frozenset(), counter=None):
    """The gather index of ``expr`` under ``perm``, the leaves in ``own`` held at the identity.

    Like ``autoperm.permutation.axis_index``, leaf by leaf (leaves numbered in DFS order).
    """
    counter = [0] if counter is None else counter
    if "g" in expr or "fixed" in expr:
        counter[0] += 1
        if "fixed" in expr or counter[0] - 1 in own:
            return torch.arange(spec.expr_size(expr))
        return perm[expr["g"]]
    parts = [leaf_index(spec, e, perm, own, counter) for e in next(iter(expr.values()))]
    device = next((p.device for p in parts if p.device.type != "cpu"), torch.device("cpu"))
    parts = [p.to(device) for p in parts]
    if "cat" in expr:
        out, off = [], 0
        for p in parts:
            out.append(p + off)
            off += len(p)
        return torch.cat(out)
    idx = torch.zeros(1, dtype=torch.long, device=device)
    for p in parts:
        idx = (idx[:, None] * len(p) + p[None, :]).reshape(-1)
    return idx


# -- matrices --------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, axis: int, indices: list, rows: int) -> torch.Tensor:
    """``t`` with ``indices[k]`` (None: keep) taken on axis k, ``axis`` first, as ``[rows, rest]``:
    one gather kernel straight into the final layout."""
    t = t.movedim(axis, 0)
    indices = [indices[axis]] + indices[:axis] + indices[axis + 1:]
    last = max((k for k, i in enumerate(indices) if i is not None), default=-1)
    if last >= 0:
        idx = [torch.arange(t.shape[k], device=t.device) if i is None else i for k, i in enumerate(indices[:last + 1])]
        idx = [i.reshape([-1] + [1] * (last - k)) for k, i in enumerate(idx)]
        t = t[tuple(idx)]
    return t.reshape(rows, -1)


def gather_a(unit: Unit, a: torch.Tensor, dtype) -> torch.Tensor:
    """``A_G``: ``[|G|, rest]`` (pairs: ``[|G|·|H|, rest]``); a view when the layout allows."""
    idx = [None] * a.dim()
    if unit.table is not None:
        idx[unit.axis] = unit.table.reshape(-1)
    rows = a.shape[unit.axis] if unit.table is None else unit.table[..., 0].numel()
    return _gather(a, unit.axis, idx, rows).to(dtype)


def gather_b(spec: PermutationSpec, unit: Unit, b: torch.Tensor, perm, dtype) -> torch.Tensor:
    """``B_G``: B with every permutation but the unit's own leaves applied, laid out like ``gather_a``."""
    idx = []
    for axis, e in enumerate(spec.axes[unit.key]):
        if e is None or (axis != unit.axis and not walk_groups(e)):
            idx.append(None)
            continue
        own = unit.own if axis == unit.axis else frozenset()
        i = leaf_index(spec, e, perm, own) if (axis != unit.axis or not unit.alone) else None
        if axis == unit.axis and unit.table is not None:
            flat = unit.table.reshape(-1)
            i = flat if i is None else i.to(b.device)[flat]
        idx.append(None if i is None else i.to(b.device))
    rows = b.shape[unit.axis] if unit.table is None else unit.table[..., 0].numel()
    return _gather(b, unit.axis, idx, rows).to(dtype)


@torch.no_grad()
def objective(spec: PermutationSpec, state_a, state_b, perm, keys=None) -> float:
    """``Σ_keys <A, P(B)>`` (float64) over ``keys`` (default: every tensor that carries a group)."""
    total = 0.0
    for key in keys if keys is not None else [k for k, ex in spec.axes.items() if any(ex)]:
        exprs = spec.axes[key]
        b = _gather(state_b[key], 0, [None if not walk_groups(e) else leaf_index(spec, e, perm).to(state_b[key].device)
                                      for e in exprs], len(state_b[key]) if exprs else 1)
        total += float(torch.dot(state_a[key].reshape(-1).double(), b.reshape(-1).double()))
    return total
