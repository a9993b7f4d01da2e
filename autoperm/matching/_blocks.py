"""Matching groups that are independent per block (``spec.per``): the wreath product's block step.

Coordinate descent first runs on the *shared view* of the spec (every inner group one permutation
for all blocks, which is a subgroup), then refines each block group ``h`` with its inner groups
``d``: for every pair (block ``i`` of A, block ``j`` of B) the best inner assignment is one
linear assignment on the inner cost ``M_d[i, j]``; the blocks are assigned on the sum of those
best values (plus ``h``'s cost where no inner group acts), and block ``i``'s inner permutation
is the one found for its partner. A move is kept only if it raises ``Σ <A, P(B)>``. Then the
other groups descend again with the blocks in place, until nothing moves.
"""
from __future__ import annotations

import numpy as np
import torch

from .._wreath import block_axis
from ..permutation import permute_tensor, with_blocks
from ..spec import PermutationSpec, walk_groups
from ._costs import _coords, _grid
from ._lap import solve_numpy

__all__ = ["shared_view", "expand_rows", "refine_blocks", "block_objective"]


def shared_view(spec: PermutationSpec) -> PermutationSpec:
    """The spec with every inner group shared by all blocks (one permutation; the Kronecker subgroup)."""
    return PermutationSpec.from_axes(spec.axes, spec.group_sizes, spec.pinned, spec.shapes, spec.unsupported)


def expand_rows(spec: PermutationSpec, perm: dict) -> dict:
    """A shared-view permutation as an element of the full group (each inner row repeated per block)."""
    return {g: (p.repeat(spec.block_count(g), 1) if g in spec.per and p.dim() == 1 else p) for g, p in perm.items()}


def block_objective(spec, a, b, perm, keys) -> float:
    """``Σ_keys <A, P(B)>`` in float64 (over a sharded state: this rank's keys, summed over the ranks)."""
    total = float(sum(torch.sum(a[k].double() * permute_tensor(spec, perm, k, b[k]).double())
                      for k in keys if _held(a, k)))
    return total if getattr(a, "local", None) is None else a.reduce_sum(total)


def _held(a, key) -> bool:
    """Whether this rank holds ``key`` (always, unless ``a`` is a state sharded over ranks)."""
    local = getattr(a, "local", None)
    return local is None or key in local


def _summed(a, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks a sharded state ``a`` spans (``t`` itself otherwise)."""
    if getattr(a, "local", None) is not None:
        from ..distributed import all_reduce_
        all_reduce_(t, a.group)
    return t


def _content(spec, perm, h, hold) -> dict:
    """``perm`` with ``h`` at the identity and ``hold`` at identity rows; ``h``'s other inner groups keep the
    permutation each B block will take (their rows re-indexed from new block position to B's block)."""
    inv = torch.argsort(perm[h].cpu())
    out = dict(perm)
    out[h] = torch.arange(spec.group_sizes[h])
    for e, hh in spec.per.items():
        if hh == h:
            out[e] = torch.arange(spec.group_sizes[e]).repeat(spec.group_sizes[h], 1) if e in hold else perm[e].cpu()[inv]
    return out


def _pair_cost(spec, a, b, perm, h, d) -> np.ndarray:
    """``M[i, j, x, y]``: A's block ``i`` inner unit ``x`` against B's block ``j`` inner unit ``y`` (others applied)."""
    nh, nd = spec.group_sizes[h], spec.group_sizes[d]
    m = torch.zeros(nh, nh, nd, nd, dtype=torch.float64)
    pc = _content(spec, perm, h, {d})
    for key, exprs in spec.axes.items():
        if not any(d in walk_groups(e) for e in exprs) or not _held(a, key):
            continue
        ta, tb = a[key].double().cpu(), permute_tensor(spec, pc, key, b[key]).double().cpu()
        for ax, e in enumerate(exprs):
            if d not in walk_groups(e):
                continue
            _, leaves = _coords(spec, e)
            coords, gs = torch.stack([v for _, v in leaves], 1), [g for g, _ in leaves]
            for leaf in (k for k, g in enumerate(gs) if g == d):
                here = coords[:, leaf] >= 0
                lh = [k for k, g in enumerate(gs) if g == h and bool((coords[here, k] >= 0).all())]
                if lh:
                    t = _grid(coords, [lh[0], leaf]).reshape(-1)
                    xa = ta.index_select(ax, t).movedim(ax, 0).reshape(nh, nd, -1)
                    xb = tb.index_select(ax, t).movedim(ax, 0).reshape(nh, nd, -1)
                else:
                    bx = block_axis(exprs, ax, h)
                    if bx is None:
                        continue
                    _, lv = _coords(spec, exprs[bx])
                    cb, gb = torch.stack([v for _, v in lv], 1), [g for g, _ in lv]
                    th = _grid(cb, [gb.index(h)]).reshape(-1)
                    td = _grid(coords, [leaf]).reshape(-1)

                    def pick(t):
                        t = t.index_select(bx, th).index_select(ax, td).movedim((bx, ax), (0, 1))
                        return t.reshape(nh, t.shape[0] // nh, nd, t.shape[1] // nd, -1).transpose(1, 2).reshape(nh, nd, -1)
                    xa, xb = pick(ta), pick(tb)
                m += torch.einsum("ixr,jyr->ijxy", xa, xb)
    return _summed(a, m).numpy()


def _plain_cost(spec, a, b, perm, h) -> np.ndarray:
    """``L[i, j]``: A's block ``i`` against B's block ``j`` in the tensors where none of ``h``'s inner groups act."""
    nh = spec.group_sizes[h]
    inner = {e for e, hh in spec.per.items() if hh == h}
    out = torch.zeros(nh, nh, dtype=torch.float64)
    pc = _content(spec, perm, h, set())
    for key, exprs in spec.axes.items():
        names = {g for e in exprs for g in walk_groups(e)}
        if h not in names or names & inner or not _held(a, key):
            continue
        ta, tb = a[key].double().cpu(), permute_tensor(spec, pc, key, b[key]).double().cpu()
        for ax, e in enumerate(exprs):
            _, leaves = _coords(spec, e) if e else (0, [])
            if not any(g == h for g, _ in leaves):
                continue
            coords, gs = torch.stack([v for _, v in leaves], 1), [g for g, _ in leaves]
            for leaf in (k for k, g in enumerate(gs) if g == h):
                t = _grid(coords, [leaf]).reshape(-1)
                out += ta.index_select(ax, t).movedim(ax, 0).reshape(nh, -1) @ \
                    tb.index_select(ax, t).movedim(ax, 0).reshape(nh, -1).T
    return _summed(a, out).numpy()


def _try(spec, a, b, perm, cand, keys, before) -> tuple[dict, bool]:
    """``perm`` with ``cand`` if that raises the objective on ``keys``."""
    if all(torch.equal(cand[g], perm[g]) for g in cand):
        return perm, False
    trial = {**perm, **cand}
    after = block_objective(spec, a, b, trial, keys)
    return (trial, True) if after > before + 1e-12 * (abs(after) + abs(before)) else (perm, False)


def refine_blocks(spec: PermutationSpec, a, b, perm: dict, blocks) -> tuple[dict, bool]:
    """One pass of block steps over the block groups ``blocks``; returns the permutation and whether it moved."""
    moved = False
    perm = {g: p.cpu() for g, p in perm.items()}
    for h in sorted(blocks):
        ds = sorted(d for d, hh in spec.per.items() if hh == h)
        keys = [k for k, ex in spec.axes.items() if {g for e in ex for g in walk_groups(e)} & {h, *ds}]
        before = block_objective(spec, a, b, perm, keys)
        nh = spec.group_sizes[h]
        value = _plain_cost(spec, a, b, perm, h)
        inner = {}
        for d in ds:
            mcost = _pair_cost(spec, a, b, perm, h, d)
            best = np.empty((nh, nh, spec.group_sizes[d]), dtype=np.int64)
            for i in range(nh):
                for j in range(nh):
                    best[i, j] = solve_numpy(np.ascontiguousarray(mcost[i, j]))
                    value[i, j] += mcost[i, j][np.arange(best.shape[2]), best[i, j]].sum()
            inner[d] = best
        p_h = solve_numpy(value)
        joint = {h: torch.from_numpy(p_h), **{d: torch.from_numpy(inner[d][np.arange(nh), p_h]) for d in ds}}
        perm, step = _try(spec, a, b, perm, joint, keys, before)
        moved |= step
        for d in ds:  # then each inner group on its own, the others at their new values (an exact step)
            perm, step = _inner_step(spec, a, b, perm, h, d, keys, None if step or len(ds) > 1 else mcost)
            moved |= step
    return perm, moved


def _inner_step(spec, a, b, perm, h, d, keys, mcost=None) -> tuple[dict, bool]:
    """Each block of A takes the best inner assignment of ``d`` to the block of B it is paired with (exact)."""
    if mcost is None:
        mcost = _pair_cost(spec, a, b, perm, h, d)
    rows = [solve_numpy(np.ascontiguousarray(mcost[i, j])) for i, j in enumerate(perm[h].tolist())]
    return _try(spec, a, b, perm, {d: torch.from_numpy(np.stack(rows))}, keys, block_objective(spec, a, b, perm, keys))


def refine_inner(spec: PermutationSpec, a, b, perm: dict, inner) -> tuple[dict, bool]:
    """Inner groups ``inner`` whose blocks stay as given (matched elsewhere, e.g. experts on their router's
    activations): each block of A takes the best inner assignment to the block of B it is paired with."""
    moved = False
    perm = {g: p.cpu() for g, p in perm.items()}
    for d in sorted(inner):
        h = spec.per[d]
        keys = [k for k, ex in spec.axes.items() if {g for e in ex for g in walk_groups(e)} & {h, d}]
        perm, step = _inner_step(spec, a, b, perm, h, d, keys)
        moved |= step
    return perm, moved


def descend_blocks(spec: PermutationSpec, a, b, init, only, descend, *, rounds: int = 8, **kw) -> dict:
    """Coordinate descent over the full group: ``descend`` (weight matching's) on the shared view, then
    block steps and a descent of the other groups with the blocks in place, in turn, until nothing moves.

    Each of ``restarts`` runs this whole sequence from its own visiting order (a shared-view optimum
    can lead the blocks into a poor local optimum of the full group); the best objective is kept."""
    restarts, seed = kw.pop("restarts", 1), kw.pop("seed", 0)
    keys = [k for k, ex in spec.axes.items() if any(ex)]
    best, best_obj = None, None
    for r in range(restarts):
        perm = _descend_once(spec, a, b, init, only, descend, rounds, shake=r, seed=seed * 1_000_003 + r,
                             restarts=1, **kw)
        obj = block_objective(spec, a, b, perm, keys) if restarts > 1 else 0.0
        if best is None or obj > best_obj:
            best, best_obj = perm, obj
    return with_blocks(best, spec)


def _descend_once(spec, a, b, init, only, descend, rounds, shake=0, **kw) -> dict:
    """One run; ``shake`` > 0 starts the block steps from random inner rows (another basin of the full group)."""
    shared = shared_view(spec)
    only = set(spec.group_sizes) if only is None else set(only)
    blocks = {h for h in set(spec.per.values()) if h in only and all(d in only for d, hh in spec.per.items() if hh == h)}
    family = blocks | {d for d, h in spec.per.items() if h in blocks}
    rows = init is not None and any(torch.as_tensor(p).dim() == 2 for p in init.values())
    if rows:  # already an element of the full group: start from it
        perm = {g: torch.as_tensor(p).long().cpu() for g, p in init.items()}
    else:
        perm = expand_rows(spec, descend(shared, a, b, init, only, **kw))
        if shake:
            gen = torch.Generator().manual_seed(kw.get("seed", 0))
            for d, h in spec.per.items():
                if h in blocks:
                    perm[d] = torch.stack([torch.randperm(spec.group_sizes[d], generator=gen)
                                           for _ in range(spec.group_sizes[h])])
    kw = {k: v for k, v in kw.items() if k != "unknown"}
    held = {d for d, h in spec.per.items() if d in only and h not in only}  # blocks placed by the caller
    family |= held
    others = sorted(only - family)
    for _ in range(rounds):
        perm, moved = refine_blocks(spec, a, b, perm, blocks)
        perm, step = refine_inner(spec, a, b, perm, held)
        moved |= step
        if not (moved or rows):
            break
        rows = False
        if not others:
            continue
        part = expand_rows(spec, {g: (perm[g] if g in family else torch.arange(n)) for g, n in spec.group_sizes.items()})
        b1 = dict(b)
        for k in spec.axes:
            if _held(a, k):
                b1[k] = permute_tensor(spec, part, k, b[k])
        start = {g: (torch.arange(n) if g in family else perm[g].cpu()) for g, n in spec.group_sizes.items()}
        rest = descend(shared, a, b1, start, set(others), unknown=(), **kw)
        if all(torch.equal(rest[g].cpu(), perm[g].cpu()) for g in others):
            break
        perm.update({g: rest[g].cpu() for g in others})
    return perm
