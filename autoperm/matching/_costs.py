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

__all__ = ["Unit", "Layout", "CostCache", "build_layout", "check_states", "leaf_index", "objective"]


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
            # a sum is finite unless an element is not or the sum overflows: check elements only then
            if t.numel() and not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}[{key!r}] has NaN or infinite values")
    names = list(states)
    for other in names[1:]:
        for key in spec.axes:
            a, b = states[names[0]][key], states[other][key]
            if a.shape != b.shape:
                raise ValueError(f"{key!r} has shape {tuple(a.shape)} in {names[0]}, {tuple(b.shape)} in {other}")
            if any(spec.axes[key]) and a.device != b.device:
                raise ValueError(f"{key!r} is on {a.device} in {names[0]}, {b.device} in {other}")


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
                if plain == mine:  # no pair on this axis: its units are the ones just built
                    unpaired[g].extend(units[g][-len(chunks):])
                elif plain:  # (pairs exclude overlap, so the plain leaves merge into one unit)
                    unpaired[g].append(unit(g, plain, torch.cat([_grid(coords, [leaf]) for leaf in plain], 1)))
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
    """``t`` with ``indices[k]`` (None: all, in order) taken on axis k, as ``[rows, rest]`` with ``axis`` first.

    The axis is moved first, so the first index_select writes the final layout (one copy)."""
    t = t.movedim(axis, 0)
    for k, old in enumerate([axis] + [k for k in range(t.dim()) if k != axis]):
        if indices[old] is not None:
            t = t.index_select(k, indices[old])
    return t.reshape(rows, -1)


def _rows(unit: Unit, t: torch.Tensor) -> int:
    return t.shape[unit.axis] if unit.table is None else unit.table[..., 0].numel()


def b_indices(spec: PermutationSpec, unit: Unit, perm, device) -> list:
    """Per-axis gather indices of the unit's B side (every permutation applied but its own leaves);
    the unit axis' entry is already taken through the table (None: identity)."""
    idx = []
    for axis, e in enumerate(spec.axes[unit.key]):
        if e is None or (axis != unit.axis and not walk_groups(e)):
            idx.append(None)
            continue
        if axis != unit.axis:
            i = leaf_index(spec, e, perm).to(device)
        else:
            i = None if unit.alone else leaf_index(spec, e, perm, unit.own).to(device)
        if axis == unit.axis and unit.table is not None:
            flat = unit.table.reshape(-1)
            i = flat if i is None else i[flat]
        idx.append(i)
    return idx


class CostCache:
    """Cost matrices ``Σ_units A_G B_G^T``, kept between visits when the memory budget allows.

    A kept matrix is updated, rather than recomputed, through the positions whose B-side index
    changed since: for an axis whose index changed at positions ``ch``, the contribution changes
    by ``A[.., ch, ..] (B_new - B_old)[.., ch, ..]^T``, a product over a slab of the tensor only
    (several changed axes telescope: each slab uses the axes already updated at their new
    indices). Late sweeps change few positions, so they cost a fraction of a full product.
    """

    def __init__(self, spec: PermutationSpec, state_a, state_b, dtype, keep=()):
        self.spec, self.a, self.b, self.dtype = spec, state_a, state_b, dtype
        self.keep = set(keep)
        self.entries: dict = {}

    def cost(self, name, units, perm) -> torch.Tensor:
        """The cost matrix of ``units`` under ``perm`` (do not modify it in place)."""
        device = self.a[units[0].key].device
        new = [b_indices(self.spec, u, perm, device) for u in units]
        entry = self.entries.get(name)
        if entry is not None:
            cost, old = entry
            plans = [_changes(u, self.a[u.key], o, n) for u, o, n in zip(units, old, new)]
            work = sum(self.a[u.key].numel() for u in units)
            if sum(f * self.a[u.key].numel() for u, (f, _) in zip(units, plans)) < 0.5 * work:
                for u, o, (_, steps) in zip(units, old, plans):
                    self._update(cost, u, o, steps)
                self.entries[name] = (cost, new)
                return cost
        cost = None
        for u, idx in zip(units, new):
            a_g = self._a(u, [None] * self.a[u.key].dim(), None)
            b_g = _gather(self.b[u.key], u.axis, idx, _rows(u, self.b[u.key])).to(self.dtype)
            cost = a_g @ b_g.T if cost is None else cost.addmm_(a_g, b_g.T)
        if name in self.keep:
            self.entries[name] = (cost, new)
        return cost

    def _a(self, u: Unit, idx: list, cols) -> torch.Tensor:
        """A's side of unit ``u``, other axes restricted by ``idx``, table columns by ``cols``."""
        a = self.a[u.key]
        if u.table is not None:
            table = u.table if cols is None else u.table[..., cols]
            idx = list(idx)
            idx[u.axis] = table.reshape(-1)
        return _gather(a, u.axis, idx, _rows(u, a)).to(self.dtype)

    def _update(self, cost, u: Unit, old: list, steps: list) -> None:
        current = list(old)
        b = self.b[u.key]
        rows = _rows(u, b)
        for axis, where, new_k in steps:
            if axis == u.axis:  # ``where``: table columns
                shape = (*u.table.shape[:-1], -1)
                pick = lambda i: None if i is None else i.reshape(shape)[..., where].reshape(-1)
                a_s = self._a(u, [None] * b.dim(), where)
            else:
                pick = lambda i: where if i is None else i[where]
                a_s = self._a(u, [where if k == axis else None for k in range(b.dim())], None)
            before = [pick(i) if k == axis else i for k, i in enumerate(current)]
            current[axis] = new_k
            after = [pick(i) if k == axis else i for k, i in enumerate(current)]
            diff = _gather(b, u.axis, after, rows).to(self.dtype) - _gather(b, u.axis, before, rows).to(self.dtype)
            cost.addmm_(a_s, diff.T)


def _changes(u: Unit, a: torch.Tensor, old: list, new: list) -> tuple[float, list]:
    """``(fraction of the unit's elements touched, [(axis, positions, new index)])`` between two index lists."""
    frac, steps = 0.0, []
    for axis, (o, n) in enumerate(zip(old, new)):
        if o is None and n is None:
            continue
        size = a.shape[axis]
        o = o if o is not None else torch.arange(size, device=n.device)
        n = n if n is not None else torch.arange(size, device=o.device)
        if axis == u.axis and u.table is not None:
            m = u.table.shape[-1]
            diff = (o.reshape(-1, m) != n.reshape(-1, m)).any(0)
            where = torch.nonzero(diff).reshape(-1)
            frac += len(where) / m
        else:
            where = torch.nonzero(o != n).reshape(-1)
            frac += len(where) / size
        if len(where):
            steps.append((axis, where, new[axis]))
    return frac, steps


@torch.no_grad()
def objective(spec: PermutationSpec, state_a, state_b, perm, keys=None) -> float:
    """``Σ_keys <A, P(B)>`` (float64) over ``keys`` (default: every tensor that carries a group).

    Over a state sharded across ranks (``_sharded.ShardedState``), each rank sums its own keys
    and the total is summed over the ranks. With module groups, every tensor a module move changes counts."""
    if spec.modules and keys is None:
        from ._modules import module_objective
        return module_objective(spec, state_a, state_b, perm)
    if spec.per and any(torch.as_tensor(p).dim() == 2 for p in perm.values()):
        from ._blocks import block_objective
        return block_objective(spec, state_a, state_b, perm,
                               keys if keys is not None else [k for k, ex in spec.axes.items() if any(ex)])
    total = 0.0
    local = getattr(state_a, "local", None)
    for key in keys if keys is not None else [k for k, ex in spec.axes.items() if any(ex)]:
        if local is not None and key not in local:
            continue
        b = state_b[key]
        for axis, e in enumerate(spec.axes[key]):
            if walk_groups(e):
                b = b.index_select(axis, leaf_index(spec, e, perm).to(b.device))
        total += float(torch.sum(state_a[key] * b, dtype=torch.float64))
    return total if local is None else state_a.reduce_sum(total)
