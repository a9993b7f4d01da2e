"""Reductions, pooling, resampling and padding: channel axes pass, spatial axes are rebuilt and pinned."""
from __future__ import annotations

from ._registry import builtin_rule


def _reduce(ctx, x, dim, keepdim):
    lay = ctx.lay(x)
    n = len(lay)
    dims = set(range(n)) if dim is None or dim == [] else {d % n for d in ([dim] if isinstance(dim, int) else dim)}
    if n == 0:
        return ()
    return tuple(ctx.fresh(1) if i in dims else a for i, a in enumerate(lay) if keepdim or i not in dims)


@builtin_rule("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax", "aten.amin", "aten.logsumexp",
               "aten.nansum", "aten.nanmean", "aten.prod.dim_int", "aten.any.dim", "aten.all.dim",
               "aten.any.dims", "aten.all.dims")
def reduce_dims(ctx, x, dim=None, keepdim=False, *rest, **kw):
    """A symmetric reduction over axes (mean, sum, max...) is invariant to their permutation: they vanish."""
    return _reduce(ctx, x, dim, keepdim)


@builtin_rule("aten.mean.default", "aten.sum.default", "aten.max.default", "aten.min.default", "aten.prod.default",
              "aten.all.default", "aten.any.default")
def reduce_all(ctx, x, *rest, **kw):
    """Reduce every axis to a scalar (``amax.default`` takes ``dim``/``keepdim``: it is ``reduce_dims``)."""
    return ()


@builtin_rule("aten.var.correction", "aten.std.correction", "aten.var_mean.correction", "aten.std_mean.correction")
def var(ctx, x, dim=None, correction=None, keepdim=False):
    """Variance / std over axes: symmetric, the axes vanish."""
    out = _reduce(ctx, x, dim, keepdim)
    return [out, out] if isinstance(ctx.out_shape(), list) else out


@builtin_rule("aten.var.dim", "aten.std.dim")
def var_dim(ctx, x, dim=None, unbiased=True, keepdim=False):
    """Variance / std over axes (older overload)."""
    return _reduce(ctx, x, dim, keepdim)


@builtin_rule("aten.linalg_vector_norm", "aten.norm.ScalarOpt_dim")
def vector_norm(ctx, x, ord=2, dim=None, keepdim=False, *rest, **kw):
    """A vector norm over axes is permutation invariant along them."""
    return _reduce(ctx, x, dim, keepdim)


@builtin_rule("aten.max.dim", "aten.min.dim")
def max_dim(ctx, x, dim, keepdim=False):
    """(values, indices) over ``dim``: indices name positions, so ``dim`` is pinned."""
    lay = ctx.lay(x)
    ctx.pin(lay[dim % len(lay)], "arg-reduction returns positions along this axis")
    out = _reduce(ctx, x, dim, keepdim)
    return [out, out]


@builtin_rule("aten.argmax", "aten.argmin")
def argmax(ctx, x, dim=None, keepdim=False):
    """Positions along ``dim`` (or the flattened tensor): pinned."""
    lay = ctx.lay(x)
    for i, a in enumerate(lay):
        if dim is None or i == dim % len(lay):
            ctx.pin(a, "arg-reduction returns positions along this axis")
    return _reduce(ctx, x, dim, keepdim) if dim is not None else ()


def _spatial(k):
    def rule(ctx, x, *args, **kwargs):
        """Acts on the last k (spatial) axes only: leading axes pass through, spatial axes pinned."""
        lay = ctx.lay(x)
        for a in lay[-k:]:
            ctx.pin(a, "spatial axis of a pooling / resampling op")
        shp = ctx.out_shape()
        main = shp[0] if isinstance(shp, list) else shp
        out = lay[:-k] + ctx.pinned_layout(main[-k:], "spatial axis of a pooling / resampling op")
        return [out] * len(shp) if isinstance(shp, list) else out
    rule.__doc__ = f"Acts on the last {k} (spatial) axes: leading axes (batch, channel) pass through."
    return rule


for _k in (1, 2, 3):
    builtin_rule(
        f"aten.max_pool{_k}d", f"aten.avg_pool{_k}d", f"aten.adaptive_avg_pool{_k}d", f"aten.adaptive_max_pool{_k}d",
        f"aten.max_pool{_k}d_with_indices", f"aten._adaptive_avg_pool{_k}d", f"aten.lp_pool{_k}d",
        f"aten.upsample_nearest{_k}d", f"aten._upsample_nearest_exact{_k}d",
        *(["aten.upsample_linear1d"] if _k == 1 else []),
        *(["aten.upsample_bilinear2d", "aten.upsample_bicubic2d", "aten._upsample_bilinear2d_aa",
           "aten._upsample_bicubic2d_aa", "aten.pixel_shuffle_spatial_only"] if _k == 2 else []),
        *(["aten.upsample_trilinear3d"] if _k == 3 else []),
    )(_spatial(_k))


@builtin_rule("aten.pad", "aten.constant_pad_nd")
def pad(ctx, x, pad, mode="constant", value=None):
    """Constant padding: a padded axis is cat[pinned pad, x's atom, pinned pad]; other modes pin it."""
    lay = list(ctx.lay(x))
    shp = ctx.out_shape()
    for i in range(len(pad) // 2):
        d = len(lay) - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        if lo == hi == 0:
            continue
        if mode != "constant" or lo < 0 or hi < 0:
            ctx.pin(lay[d], f"{mode} padding")
            lay[d] = ctx.fresh(shp[d], f"{mode} padding at {ctx.where}")
        else:
            lay[d] = ctx.cat([ctx.fresh(lo, f"padding at {ctx.where}"), lay[d], ctx.fresh(hi, f"padding at {ctx.where}")])
    return tuple(lay)
