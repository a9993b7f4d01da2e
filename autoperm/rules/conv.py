"""Convolutions (1/2/3-d, grouped, depthwise, transposed) and im2col/col2im. Kernel and spatial axes are pinned."""
from __future__ import annotations

from ._registry import builtin_rule


def _nth(v, i: int):
    return v[i] if isinstance(v, (list, tuple)) and len(v) > 1 else (v[0] if isinstance(v, (list, tuple)) else v)


def _pointwise(sw, i, stride, padding, output_padding) -> bool:
    """Spatial axis ``i`` maps position p to position p alone: kernel 1, stride 1, no padding."""
    pad = 0 if isinstance(padding, str) else _nth(padding, i)
    return sw[2 + i] == 1 and _nth(stride, i) == 1 and pad == 0 and _nth(output_padding, i) == 0


def _conv(ctx, x, weight, bias, groups, transposed, stride=1, padding=0, output_padding=0):
    lx, lw, sw = ctx.lay(x), ctx.lay(weight), ctx.shape(weight)
    k = len(sw) - 2
    c = len(lx) - k - 1  # channel axis (1 when batched, 0 when not)
    for a in lw[2:]:
        ctx.pin(a, "convolution kernel axis")
    # a 1-wide kernel with stride 1 and no padding is position-wise along that axis (CoaT's aggregate head
    # runs a Conv1d over [stages, channels]): the axis passes through; otherwise positions mix: pinned
    through = [_pointwise(sw, i, stride, padding, output_padding) for i in range(k)]
    for a, keep in zip(lx[c + 1:], through):
        if not keep:
            ctx.pin(a, "spatial axis of a convolution")
    w_in, w_out = (lw[0], lw[1]) if transposed else (lw[1], lw[0])
    if groups == 1:
        ctx.union(lx[c], w_in)
        out_c = w_out
    elif not transposed:
        # y[g*co + o] = sum_i W[g*co + o, i] x[g*ci + i]: block index g shared, within-block axes tie.
        g_in, ci = ctx.split_prod(lx[c], [groups, sw[1]], "grouped conv input")
        g_out, _ = ctx.split_prod(lw[0], [groups, sw[0] // groups], "grouped conv output")
        ctx.union(g_in, g_out)
        ctx.union(ci, lw[1])
        out_c = lw[0]
    else:
        g_in, ci = ctx.split_prod(lx[c], [groups, sw[0] // groups], "grouped transposed conv input")
        g_w, ci_w = ctx.split_prod(lw[0], [groups, sw[0] // groups], "grouped transposed conv weight")
        ctx.union(g_in, g_w)
        ctx.union(ci, ci_w)
        out_c = ctx.prod([g_in, lw[1]])
    if ctx.lay(bias) is not None:
        ctx.union(ctx.lay(bias)[0], out_c)
    out_shape = ctx.out_shape()
    spatial = tuple(lx[c + 1 + i] if keep else ctx.fresh(n, f"spatial axis of a convolution at {ctx.where}")
                    for i, (n, keep) in enumerate(zip(out_shape[c + 1:], through)))
    return lx[:c] + (out_c,) + spatial


@builtin_rule("aten.conv1d", "aten.conv2d", "aten.conv3d")
def conv(ctx, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y[o] = sum_i W[o, i] * x[i]: x[c] ~ W[1], y[c] ~ W[0] ~ b; groups tie block indices."""
    return _conv(ctx, x, weight, bias, groups, transposed=False, stride=stride, padding=padding)


@builtin_rule("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
def conv_transpose(ctx, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Transposed conv, W is (in, out/groups, k...): x[c] ~ W[0], y[c] ~ W[1] ~ b."""
    return _conv(ctx, x, weight, bias, groups, transposed=True, stride=stride, padding=padding,
                 output_padding=output_padding)


@builtin_rule("aten.convolution", "aten._convolution")
def convolution(ctx, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups, *rest):
    """The generic convolution op: dispatch on ``transposed``."""
    return _conv(ctx, x, weight, bias, groups, transposed=transposed, stride=stride, padding=padding,
                 output_padding=output_padding if transposed else 0)


def _pairs(v):
    return list(v) * (2 // len(v)) if isinstance(v, (list, tuple)) else [v, v]


@builtin_rule("aten.im2col")
def im2col(ctx, x, kernel_size, dilation, padding, stride):
    """Unfold patches: out[c*K + k, l] = x[c, pos(k, l)], K = kh*kw. out[c] = x[c] x kernel offsets (pinned);
    spatial and patch-position axes pinned."""
    lx = ctx.lay(x)
    c = len(lx) - 3
    for a in lx[c + 1:]:
        ctx.pin(a, "spatial axis of im2col")
    kh, kw = _pairs(kernel_size)
    out = ctx.out_shape()
    k = ctx.fresh(kh * kw, f"kernel offset axis of im2col at {ctx.where}")
    return lx[:c] + (ctx.prod([lx[c], k]), ctx.fresh(out[-1], f"patch position axis of im2col at {ctx.where}"))


@builtin_rule("aten.col2im")
def col2im(ctx, x, output_size, kernel_size, dilation, padding, stride):
    """Fold patches back (summing overlaps): x[c*K + k, l] adds into out[c, pos(k, l)]. out[c] ~ the channel
    factor of x[c]; the kernel-offset factor, patch positions and output spatial axes are pinned."""
    lx = ctx.lay(x)
    c = len(lx) - 2
    kh, kw = _pairs(kernel_size)
    ch, k = ctx.split_prod(lx[c], [ctx.shape(x)[c] // (kh * kw), kh * kw], "col2im channels")
    ctx.pin(k, "kernel offset axis of col2im")
    ctx.pin(lx[c + 1], "patch position axis of col2im")
    return lx[:c] + (ch,) + ctx.pinned_layout(ctx.out_shape()[c + 1:], "spatial axis of col2im")
