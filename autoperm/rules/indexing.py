"""Indexing by integer tensors: the indexed axis is pinned, the index's axes take its place."""
from __future__ import annotations

import torch

from ._ids import address, domain, drop, id_aware
from ._registry import builtin_rule


@builtin_rule("aten.embedding")
@id_aware
def embedding(ctx, weight, indices, *rest):
    """Rows are looked up by id: weight[0] pinned (tied to the ids' domain when known); out = indices' axes + (weight[1],)."""
    lw = ctx.lay(weight)
    address(ctx, lw[0], indices, "embedding rows are addressed by ids")
    return ctx.lay(indices) + (lw[1],)


@builtin_rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
@id_aware
def index(ctx, x, indices):
    """x[..., i0, i1, ...] by integer index tensors: indexed axes are pinned; the indices' broadcast axes replace
    them (where the indexed axes were if adjacent, else in front, as NumPy does). Boolean masks pin. An index of
    known id domain (expert ids from ``topk``) ties the indexed axis to that domain instead."""
    lay = ctx.lay(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or any(ctx.shape(indices[d]) is None or _is_bool(indices[d]) for d in used):
        raise NotImplementedError("indexing by boolean masks or non-tensors")
    for d in used:
        address(ctx, lay[d], indices[d])
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
@id_aware
def gather(ctx, x, dim, index, *, sparse_grad=False):
    """out[..i, j, k..] = x[..i, index[..i, j, k..], k..]: x[dim] pinned; out ~ index; x's other axes ~ index's
    where the sizes agree (a shorter index reads a prefix of that axis: both are pinned)."""
    lx, li, sx, si = ctx.lay(x), ctx.lay(index), ctx.shape(x), ctx.shape(index)
    d = dim % len(lx)
    address(ctx, lx[d], index)
    _tie_where_sizes_agree(ctx, lx, sx, li, si, skip=d, why="gather reads a prefix of this axis")
    return li


def _tie_where_sizes_agree(ctx, la, sa, lb, sb, skip, why):
    """Tie axis i of two tensors where their sizes agree; pin both where one reads a prefix of the other."""
    for i in range(len(la)):
        if i == skip:
            continue
        if sa[i] == sb[i]:
            ctx.union(la[i], lb[i])
        else:
            ctx.pin(la[i], why)
            ctx.pin(lb[i], why)


@builtin_rule("aten.index_select")
@id_aware
def index_select(ctx, x, dim, index):
    """index_select: ``dim`` is pinned (tied to the index's id domain when known), the index's axis replaces it."""
    lay = ctx.lay(x)
    d = dim % len(lay)
    address(ctx, lay[d], index)
    return lay[:d] + ctx.lay(index) + lay[d + 1:]


@builtin_rule("aten.one_hot")
@id_aware
def one_hot(ctx, x, num_classes=-1):
    """out[.., c] = (x[..] == c): out's leading axes ~ x; the class axis is addressed by x's values (ids): pinned,
    or the ids' domain when known (a one-hot routing mask over experts)."""
    n = ctx.out_shape()[-1]
    dom = domain(ctx, x)
    if dom is not None and ctx.size(dom) == n:
        return ctx.lay(x) + (dom,)
    drop(ctx, x, "one-hot of ids with another number of classes")
    return ctx.lay(x) + (ctx.fresh(n, f"one-hot class axis (addressed by ids) at {ctx.where}"),)


_SYMMETRIC = {"sum", "prod", "mean", "amax", "amin"}


@builtin_rule("aten.scatter", "aten.scatter_", "aten.scatter_add", "aten.scatter_add_", "aten.scatter_reduce",
              "aten.scatter_reduce_")
@id_aware
def scatter(ctx, x, dim, index, src=None, *rest, reduce=None, **kw):
    """out = x; out[.., index[.., j, ..], ..] = src[.., j, ..] along ``dim``: x[dim] is addressed by the index
    (pinned, or tied to its id domain); other axes: x ~ index ~ src where sizes agree (a shorter index writes a
    prefix: pinned). The written entries' axis (index[dim] ~ src[dim]) is free when they are summed or reduced
    symmetrically, or are one scalar; an overwrite of tensor values depends on their order: pinned."""
    lx, li, sx, si = ctx.lay(x), ctx.lay(index), ctx.shape(x), ctx.shape(index)
    d = dim % len(lx)
    address(ctx, lx[d], index)
    ls, ss = ctx.lay(src), ctx.shape(src)
    name = getattr(getattr(ctx.node.target, "overloadpacket", None), "__name__", "")
    how = reduce if reduce is not None else (rest[0] if rest and isinstance(rest[0], str) else None)
    ordered = ls is not None and not name.startswith("scatter_add") and how not in _SYMMETRIC | {"add", "multiply"}
    _tie_where_sizes_agree(ctx, lx, sx, li, si, skip=d, why="scatter writes a prefix of this axis")
    if ls is not None:
        _tie_where_sizes_agree(ctx, ls, ss, li, si, skip=None, why="scatter reads a prefix of this axis")
    if ordered:
        ctx.pin(li[d], "overwritten entries depend on their order")
    return lx


@builtin_rule("aten.index_add", "aten.index_add_")
@id_aware
def index_add(ctx, x, dim, index, source, alpha=1):
    """out = x; out[.., index[j], ..] += alpha * source[.., j, ..]: x[dim] addressed by the index (pinned, or tied
    to its id domain); source[dim] ~ index[0] (a sum: order-free); source's other axes ~ x's."""
    lx, ls = ctx.lay(x), ctx.lay(source)
    d = dim % len(lx)
    address(ctx, lx[d], index)
    ctx.union(ls[d], ctx.lay(index)[0])
    ctx.unify(lx[:d] + lx[d + 1:], ls[:d] + ls[d + 1:])
    return lx
