"""Indexing by integer tensors: the indexed axis is pinned, the index's axes take its place."""
from __future__ import annotations

import torch

from ._registry import builtin_rule


@builtin_rule("aten.embedding")
def embedding(ctx, weight, indices, *rest):
    """Rows are looked up by id: weight[0] pinned; out = indices' axes + (weight[1],)."""
    lw = ctx.lay(weight)
    ctx.pin(lw[0], "embedding rows are addressed by ids")
    return ctx.lay(indices) + (lw[1],)


@builtin_rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def index(ctx, x, indices):
    """x[..., i0, i1, ...] by integer index tensors: indexed axes are pinned; the indices' broadcast axes replace
    them (where the indexed axes were if adjacent, else in front, as NumPy does). Boolean masks pin."""
    lay = ctx.lay(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or any(ctx.shape(indices[d]) is None or _is_bool(indices[d]) for d in used):
        raise NotImplementedError("indexing by boolean masks or non-tensors")
    for d in used:
        ctx.pin(lay[d], "axis addressed by an index tensor")
    idx = _broadcast_together(ctx, [indices[d] for d in used])
    if used == list(range(used[0], used[-1] + 1)):
        return lay[:used[0]] + idx + lay[used[-1] + 1:]
    return idx + tuple(a for i, a in enumerate(lay) if i not in used)


def _is_bool(t) -> bool:
    return t.meta["val"].dtype == torch.bool


def _broadcast_together(ctx, tensors) -> tuple:
    """The layout of the broadcast of several index tensors: axes aligned from the right tie (size 1 broadcasts)."""
    shapes, lays = [ctx.shape(t) for t in tensors], [ctx.lay(t) for t in tensors]
    n = max(len(s) for s in shapes)
    out = []
    for i in range(n):
        atoms = [lay[len(lay) - n + i] for lay, s in zip(lays, shapes) if len(s) - n + i >= 0 and s[len(s) - n + i] != 1]
        for a in atoms[1:]:
            ctx.union(atoms[0], a)
        out.append(atoms[0] if atoms else ctx.fresh(1))
    return tuple(out)


@builtin_rule("aten.gather")
def gather(ctx, x, dim, index, *, sparse_grad=False):
    """out[..i, j, k..] = x[..i, index[..i, j, k..], k..]: x[dim] pinned; out ~ index; x's other axes ~ index's
    where the sizes agree (a shorter index reads a prefix of that axis: both are pinned)."""
    lx, li, sx, si = ctx.lay(x), ctx.lay(index), ctx.shape(x), ctx.shape(index)
    d = dim % len(lx)
    ctx.pin(lx[d], "axis addressed by an index tensor")
    for i in range(len(lx)):
        if i == d:
            continue
        if sx[i] == si[i]:
            ctx.union(lx[i], li[i])
        else:
            ctx.pin(lx[i], "gather reads a prefix of this axis")
            ctx.pin(li[i], "gather reads a prefix of this axis")
    return li


@builtin_rule("aten.index_select")
def index_select(ctx, x, dim, index):
    """index_select: ``dim`` is pinned, the index's axis replaces it."""
    lay = ctx.lay(x)
    d = dim % len(lay)
    ctx.pin(lay[d], "axis addressed by an index tensor")
    return lay[:d] + ctx.lay(index) + lay[d + 1:]


@builtin_rule("aten.one_hot")
def one_hot(ctx, x, num_classes=-1):
    """out[.., c] = (x[..] == c): out's leading axes ~ x; the class axis is addressed by x's values (ids): pinned."""
    n = ctx.out_shape()[-1]
    return ctx.lay(x) + (ctx.fresh(n, f"one-hot class axis (addressed by ids) at {ctx.where}"),)
