"""Element-wise ops: every tensor argument shares the output's atoms axis by axis (with broadcasting)."""
from __future__ import annotations

from ._registry import builtin_rule

UNARY = """relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid
hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish mish_ softplus relu6 neg exp
log log1p expm1 sqrt rsqrt abs square sin cos erf reciprocal sign floor ceil round trunc frac clamp clamp_
clamp_min clamp_min_ clamp_max clamp_max_ logical_not bitwise_not isnan isinf nan_to_num dropout dropout_
feature_dropout alpha_dropout contiguous clone alias detach lift_fresh_copy _to_copy to type_as
silu_backward sgn fill_ zero_ detach_""".split()

BINARY = """add add_ sub sub_ rsub mul mul_ div div_ maximum minimum pow where eq ne gt lt ge le logical_and
logical_or logical_xor bitwise_and bitwise_or atan2 fmod remainder floor_divide addcmul addcdiv lerp
masked_fill hypot xlogy copy copy_ bitwise_xor __and__ __or__ __xor__""".split()


@builtin_rule(*(f"aten.{n}" for n in BINARY), "aten.clamp.Tensor", "aten.clamp_.Tensor", "aten.clamp_min.Tensor",
              "aten.clamp_max.Tensor", "aten.clamp_min_.Tensor", "aten.clamp_max_.Tensor",
              "aten.max.other", "aten.min.other")
def broadcast(ctx, *args, **kwargs):
    """Element-wise with broadcasting: aligned axes of all tensor arguments and the output tie."""
    return ctx.broadcast(*args, *kwargs.values())


@builtin_rule(*(f"aten.{n}" for n in UNARY))
def unary(ctx, x, *args, **kwargs):
    """Element-wise in ``x`` (other arguments are scalars or only supply a dtype/device): out ~ x."""
    return ctx.stacked(x) or ctx.lay(x)


@builtin_rule("aten.native_dropout")
def native_dropout(ctx, x, *args):
    """Returns (out, mask), both ~ x."""
    return [ctx.lay(x), ctx.lay(x)]


@builtin_rule("aten.prelu")
def prelu(ctx, x, weight):
    """PReLU: a per-channel slope on axis 1 (or one shared slope): weight[0] ~ x[1]."""
    if ctx.shape(weight)[0] > 1:
        ctx.union(ctx.lay(weight)[0], ctx.lay(x)[1])
    return ctx.lay(x)
