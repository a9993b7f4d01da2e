"""Normalization layers: affine parameters and running statistics follow the normalized channel."""
from __future__ import annotations

from ._registry import builtin_rule


def _channel_stats(ctx, x, tensors):
    """Tie every per-channel tensor (weight, bias, running stats) to x's axis 1."""
    c = ctx.lay(x)[1]
    for t in tensors:
        if ctx.lay(t) is not None and len(ctx.lay(t)) == 1 and ctx.shape(t)[0] == ctx.size(c):
            ctx.union(ctx.lay(t)[0], c)
    return c


def _extra_outputs(ctx, x, main):
    """Ops returning (out, stats...): per-channel stats ~ x[1], other shapes fresh (empty or pinned)."""
    c = ctx.lay(x)[1]
    outs = [main]
    for s in ctx.out_shape()[1:]:
        if s is None:
            outs.append(None)
        elif len(s) == 1 and s[0] == ctx.size(c) and s[0] > 1:
            outs.append((c,))
        else:
            outs.append(ctx.pinned_layout(s, "normalization statistics"))
    return outs


@builtin_rule("aten.batch_norm")
def batch_norm(ctx, x, weight, bias, running_mean, running_var, *rest):
    """BatchNorm over axis 1: weight, bias, running_mean, running_var ~ x[1]; out ~ x."""
    _channel_stats(ctx, x, [weight, bias, running_mean, running_var])
    return ctx.lay(x)


@builtin_rule("aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit",
               "aten._native_batch_norm_legit_functional", "aten.native_batch_norm",
               "aten.cudnn_batch_norm", "aten.miopen_batch_norm")
def native_batch_norm(ctx, x, weight, bias, running_mean=None, running_var=None, *rest):
    """BatchNorm returning (out, stats...): per-channel tensors and stats ~ x[1]."""
    _channel_stats(ctx, x, [weight, bias, running_mean, running_var])
    return _extra_outputs(ctx, x, ctx.lay(x))


@builtin_rule("aten.instance_norm")
def instance_norm(ctx, x, weight, bias, running_mean, running_var, *rest):
    """InstanceNorm: per-channel statistics; affine and running stats ~ x[1]."""
    _channel_stats(ctx, x, [weight, bias, running_mean, running_var])
    return ctx.lay(x)


def _last_axes(ctx, x, normalized_shape, tensors):
    lx = ctx.lay(x)
    k = len(normalized_shape)
    for t in tensors:
        lt = ctx.lay(t)
        if lt is not None:
            for a, b in zip(lt, lx[-k:]):
                ctx.union(a, b)
    return lx


@builtin_rule("aten.layer_norm")
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, *rest):
    """LayerNorm over the last axes (statistics are permutation invariant): weight, bias ~ x[-k:]."""
    return _last_axes(ctx, x, normalized_shape, [weight, bias])


@builtin_rule("aten.native_layer_norm")
def native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    """LayerNorm returning (out, mean, rstd); mean and rstd keep x's leading axes."""
    lx = _last_axes(ctx, x, normalized_shape, [weight, bias])
    k = len(normalized_shape)
    return [lx] + [lx[:-k] + tuple(ctx.fresh(1) for _ in range(k))] * 2


@builtin_rule("aten.rms_norm")
def rms_norm(ctx, x, normalized_shape, weight=None, eps=None):
    """RMSNorm over the last axes: weight ~ x[-k:]."""
    return _last_axes(ctx, x, normalized_shape, [weight])


@builtin_rule("aten.group_norm")
def group_norm(ctx, x, num_groups, weight=None, bias=None, *rest):
    """GroupNorm: x[1] = prod[groups, within]; statistics per group; weight, bias ~ x[1]."""
    c = ctx.lay(x)[1]
    ctx.split_prod(c, [num_groups, ctx.size(c) // num_groups], "group norm")
    _channel_stats(ctx, x, [weight, bias])
    return ctx.lay(x)


@builtin_rule("aten.native_group_norm")
def native_group_norm(ctx, x, weight, bias, n, c, hw, num_groups, eps):
    """GroupNorm returning (out, mean, rstd): mean and rstd are (N, groups)."""
    out = group_norm(ctx, x, num_groups, weight, bias)
    return [out, ctx.pinned_layout(ctx.out_shape()[1], "group norm statistics"),
            ctx.pinned_layout(ctx.out_shape()[2], "group norm statistics")]
