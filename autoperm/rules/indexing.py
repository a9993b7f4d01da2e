"""Indexing by integer tensors: the indexed axis is pinned, the index's axes take its place."""
from __future__ import annotations

from ._registry import builtin_rule


@builtin_rule("aten.embedding")
def embedding(ctx, weight, indices, *rest):
    """Rows are looked up by id: weight[0] pinned; out = indices' axes + (weight[1],)."""
    lw = ctx.lay(weight)
    ctx.pin(lw[0], "embedding rows are addressed by ids")
    return ctx.lay(indices) + (lw[1],)


@builtin_rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def index(ctx, x, indices):
    """x[..., idx, ...] with one index tensor: that axis is pinned, idx's axes replace it (position bias tables)."""
    lay = ctx.lay(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    if len(used) != 1:
        raise NotImplementedError("advanced indexing with several index tensors")
    d = used[0]
    ctx.pin(lay[d], "axis addressed by an index tensor")
    return lay[:d] + ctx.lay(indices[d]) + lay[d + 1:]


@builtin_rule("aten.index_select")
def index_select(ctx, x, dim, index):
    """index_select: ``dim`` is pinned, the index's axis replaces it."""
    lay = ctx.lay(x)
    d = dim % len(lay)
    ctx.pin(lay[d], "axis addressed by an index tensor")
    return lay[:d] + ctx.lay(index) + lay[d + 1:]
