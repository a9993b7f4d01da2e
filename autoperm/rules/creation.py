"""Tensor factories and no-op assertions."""
from __future__ import annotations

from ._registry import builtin_rule


@builtin_rule("aten.zeros", "aten.ones", "aten.full", "aten.zeros_like", "aten.ones_like", "aten.full_like",
               "aten.scalar_tensor", "aten.new_zeros", "aten.new_ones", "aten.new_full")
def constant(ctx, *args, **kwargs):
    """A constant-valued tensor is unchanged by any permutation of any axis: free atoms."""
    return ctx.fresh_layout(ctx.out_shape())


@builtin_rule("aten.arange", "aten.linspace", "aten.randn", "aten.rand", "aten.randint", "aten.empty",
               "aten.empty_like", "aten.new_empty", "aten.eye", "aten.randn_like", "aten.rand_like",
               "aten.bernoulli", "aten.normal")
def varying(ctx, *args, **kwargs):
    """Values that vary by position (or are random): pinned."""
    return ctx.pinned_layout(ctx.out_shape(), "position-dependent or random values")


@builtin_rule("aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size",
               "aten.sym_constrain_range", "aten._assert_async")
def assertion(ctx, *args, **kwargs):
    """Runtime assertions produce nothing."""
    return None
