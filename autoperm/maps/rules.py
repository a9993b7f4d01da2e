"""How each op acts on a space that a continuous map moves: the rule table of map inference.

A *space* is a free permutation atom (a group of hidden units, per block where its permutations are
independent per block). A map ``A`` acts on every tensor that carries the space, as ``A·`` (primal)
or ``A^{-T}·`` (dual) along that axis. A rule says, for one op, which kinds of map commute with it
and how the roles of its operands and result are tied (``Checker`` in ``autoperm.maps.infer``):

- ``chk.same(u, v)`` / ``chk.opposite(u, v)``: two axes transform alike / one as the other's dual;
- ``chk.keep(kinds, reason)``: only these kinds commute with the op (the others are blocked, with
  the reason recorded in a ``MapPin``);
- ``chk.center(reason)``: the op commutes only with orthogonal maps that fix the all-ones vector
  (a mean over the space, a shift constant along it: LayerNorm's mean removal);
- ``chk.fold(...)``: an elementwise scale (and shift) of the space that is folded into the linear
  layers reading it before the map acts (a norm's weight).

An op that touches a space and has no rule here blocks every kind on it. Kinds are
``"orthogonal"``, ``"invertible"`` and ``"scale"`` (positive diagonal).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..rules._node import arg as _arg, reduced_dims as _dims, shape as _shape
from ..rules._registry import NameTable, op_names

__all__ = ["register_map_rule", "get_map_rule", "LINEAR", "ORTHOGONAL", "SCALE"]

LINEAR = frozenset({"orthogonal", "invertible", "scale"})  # every linear map commutes
ORTHOGONAL = frozenset({"orthogonal"})  # norm-preserving maps only
SCALE = frozenset({"scale"})  # positive diagonal maps only (positively homogeneous ops)

_RULES = NameTable()


def register_map_rule(*names):
    """Register ``fn(chk, node)`` for ops named ``aten.op`` (any overload) or ``aten.op.overload``."""
    return _RULES.register(*names)


def get_map_rule(node) -> Callable | None:
    return _RULES.lookup(node)


# -- data movement: every element keeps its coordinates ------------------------------------------------

_MOVE = """reshape view _unsafe_view reshape_as view_as _reshape_alias flatten unflatten permute transpose swapaxes
swapdims t numpy_T unsqueeze squeeze expand expand_as broadcast_to contiguous clone alias detach _to_copy to type_as
lift_fresh_copy unbind select slice slice_copy narrow split split_with_sizes split_with_sizes_copy chunk
tensor_split unsafe_split cat concat concatenate stack _assert_tensor_metadata roll flip repeat tile
repeat_interleave pixel_shuffle pixel_unshuffle getitem"""


@register_map_rule(*(f"aten.{n}" for n in _MOVE.split()), "getitem")
def _move(chk, node):
    """Elements move, keep their coordinates (a space's units stay whole: a free atom is never cut)."""
    chk.all_same(node)


@register_map_rule("aten.index.Tensor", "aten._unsafe_index.Tensor")
def _index(chk, node):
    """``x[..., idx, ...]``: a move, as long as no index runs along the space."""
    x, idx = node.args[0], node.args[1]
    if any(a < len(idx) and idx[a] is not None for a in chk.axes(x)):
        chk.keep(frozenset(), f"indexes along the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.index_select", "aten.gather")
def _select_along(chk, node):
    x, dim = node.args[0], node.args[1]
    if dim % len(_shape(x)) in chk.axes(x):
        chk.keep(frozenset(), f"selects along the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.dropout", "aten.native_dropout", "aten.feature_dropout", "aten.alpha_dropout")
def _dropout(chk, node):
    p, train = _arg(node, 1, "p", 0.5), _arg(node, 2, "train", True)
    if train and p:
        chk.keep(frozenset(), f"dropout in train mode at {chk.where(node)} (a random elementwise mask)")
    chk.all_same(node)


@register_map_rule("aten.constant_pad_nd", "aten.pad")
def _pad(chk, node):
    value = _arg(node, 2, "value", 0) or 0
    if value != 0:
        chk.keep(frozenset(), f"pads with {value} at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.embedding")
def _embedding(chk, node):
    """A table's rows are vectors of the space (its axis 1): the looked-up rows transform alike."""
    w = node.args[0]
    if chk.axes(w) != [1]:
        chk.keep(frozenset(), f"embedding table indexed along the space at {chk.where(node)}")
    chk.all_same(node)


# -- element-wise ----------------------------------------------------------------------------------------

_NONLINEAR = """gelu silu sigmoid tanh hardswish hardsigmoid hardtanh elu selu celu mish softplus relu6 exp log log1p
expm1 sqrt rsqrt abs sin cos erf reciprocal sign floor ceil round trunc frac clamp clamp_min clamp_max nan_to_num
maximum minimum pow square addcmul addcdiv lerp eq ne lt le gt ge logical_not bitwise_not __and__ __or__"""


@register_map_rule(*(f"aten.{n}{s}" for n in _NONLINEAR.split() for s in ("", "_")))
def _nonlinear(chk, node):
    if node.target in (torch.ops.aten.pow.Tensor_Scalar, torch.ops.aten.square.default) and chk.squared(node):
        return  # ||x||²: read only by a sum over the space (an RMS statistic)
    chk.keep(frozenset(), f"nonlinear op {chk.where(node)}")


@register_map_rule("aten.relu", "aten.relu_", "aten.leaky_relu", "aten.leaky_relu_")
def _relu(chk, node):
    """Positively homogeneous: commutes with positive scalings, and nothing larger."""
    chk.keep(SCALE, f"{chk.where(node)} commutes with positive scalings only")
    chk.all_same(node)


@register_map_rule("aten.neg", "aten.positive")
def _neg(chk, node):
    chk.all_same(node)


@register_map_rule("aten.add", "aten.add_", "aten.sub", "aten.sub_", "aten.rsub")
def _add(chk, node):
    """A sum of tensors that carry the space alike; a term constant along it is a shift (centred maps only)."""
    out = chk.axes(node)
    terms = [a for a in node.args[:2]]
    for t in terms:
        if isinstance(t, torch.fx.Node) and chk.axes(t):
            continue
        if t is None or (not isinstance(t, torch.fx.Node) and t == 0):
            continue
        if out:
            chk.center(f"adds a term constant along the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.mul", "aten.mul_", "aten.div", "aten.div_")
def _mul(chk, node):
    """Scaling by a tensor constant along the space is linear; the product of two tensors in the space is not,
    unless one is a norm's elementwise scale that folds into the linear layers reading the result."""
    a, b = node.args[0], node.args[1]
    ca = isinstance(a, torch.fx.Node) and bool(chk.axes(a))
    cb = isinstance(b, torch.fx.Node) and bool(chk.axes(b))
    if ca and cb:
        if node.target in (torch.ops.aten.mul.Tensor,) and chk.fold_scale(node):
            return
        if a is b and chk.squared(node):
            return
        chk.keep(frozenset(), f"elementwise product of two tensors in the space at {chk.where(node)}")
    elif cb and node.target in (torch.ops.aten.div.Tensor, torch.ops.aten.div_.Tensor):
        chk.keep(frozenset(), f"divides by a tensor in the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.where")
def _where(chk, node):
    c, a, b = node.args[:3]
    if isinstance(c, torch.fx.Node) and chk.axes(c):
        chk.keep(frozenset(), f"a condition that varies along the space at {chk.where(node)}")
    for t in (a, b):
        if not (isinstance(t, torch.fx.Node) and chk.axes(t)) and t != 0:
            chk.keep(frozenset(), f"selects a value constant along the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.masked_fill", "aten.masked_fill_")
def _masked_fill(chk, node):
    x, mask, value = node.args[:3]
    if isinstance(mask, torch.fx.Node) and chk.axes(mask):
        chk.keep(frozenset(), f"a mask that varies along the space at {chk.where(node)}")
    if isinstance(value, torch.fx.Node) or value != 0:
        chk.keep(frozenset(), f"fills with a value other than 0 at {chk.where(node)}")
    chk.all_same(node)


# -- reductions --------------------------------------------------------------------------------------------


@register_map_rule("aten.sum", "aten.mean")
def _sum(chk, node):
    """Linear along other axes; over the space: ``1ᵀAx = 1ᵀx`` for centred maps, or an RMS statistic of ``x²``."""
    x = node.args[0]
    dims = _dims(node, 1, "dim", len(_shape(x)))
    if set(dims) & set(chk.axes(x)):
        if not chk.is_square(x):
            chk.center(f"{chk.op(node)} over the space at {chk.where(node)}")
        return
    chk.all_same(node)


@register_map_rule("aten.amax", "aten.amin", "aten.max", "aten.min")
def _max(chk, node):
    """A max over other axes commutes with positive scalings (per unit); over the space with nothing."""
    x = node.args[0]
    dims = _dims(node, 1, "dim", len(_shape(x)))
    if set(dims) & set(chk.axes(x)):
        chk.keep(frozenset(), f"{chk.op(node)} over the space at {chk.where(node)}")
    chk.keep(SCALE, f"{chk.where(node)} commutes with positive scalings only")
    chk.all_same(node)


@register_map_rule("aten.linalg_vector_norm")
def _vector_norm(chk, node):
    x = node.args[0]
    ord_ = _arg(node, 1, "ord", 2)
    dims = _dims(node, 2, "dim", len(_shape(x)))
    if ord_ == 2 and set(chk.axes(x)) <= set(dims):
        chk.keep(ORTHOGONAL, f"a 2-norm over the space at {chk.where(node)} is kept by orthogonal maps only")
        return
    chk.keep(frozenset(), f"norm of order {ord_} at {chk.where(node)}")


@register_map_rule("aten.var", "aten.std", "aten.var_mean", "aten.std_mean")
def _var(chk, node):
    x = node.args[0]
    dims = _dims(node, 1, "dim", len(_shape(x)))
    if set(chk.axes(x)) <= set(dims):
        chk.center(f"{chk.op(node)} over the space at {chk.where(node)}")
        return
    chk.keep(frozenset(), f"{chk.op(node)} across other axes at {chk.where(node)}")


@register_map_rule("aten.avg_pool1d", "aten.avg_pool2d", "aten.avg_pool3d", "aten.adaptive_avg_pool1d",
                   "aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool3d", "aten.upsample_nearest2d",
                   "aten.upsample_bilinear2d", "aten._upsample_nearest_exact2d")
def _spatial_linear(chk, node):
    """Linear over spatial positions, the same for every channel."""
    x = node.args[0]
    if any(a >= 2 for a in chk.axes(x)):
        chk.keep(frozenset(), f"{chk.op(node)} pools along the space at {chk.where(node)}")
    chk.all_same(node)


@register_map_rule("aten.max_pool1d", "aten.max_pool2d", "aten.max_pool3d", "aten.adaptive_max_pool2d",
                   "aten.max_pool2d_with_indices")
def _max_pool(chk, node):
    x = node.args[0]
    if any(a >= 2 for a in chk.axes(x)):
        chk.keep(frozenset(), f"{chk.op(node)} pools along the space at {chk.where(node)}")
    chk.keep(SCALE, f"{chk.where(node)} commutes with positive scalings only")
    chk.all_same(node)


# -- normalisation ------------------------------------------------------------------------------------------

@register_map_rule("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(chk, node):
    """Mean removal and RMS over the space commute with orthogonal maps fixing the all-ones vector; the
    elementwise weight and bias fold into the linear layers that read the output."""
    chk.normalisation(node, node.args[0], len(node.args[1]), _arg(node, 2, "weight"), _arg(node, 3, "bias"),
                      centred=True)


@register_map_rule("aten.rms_norm", "aten._fused_rms_norm")
def _rms_norm(chk, node):
    chk.normalisation(node, node.args[0], len(node.args[1]), _arg(node, 2, "weight"), None, centred=False)


# -- contractions -----------------------------------------------------------------------------------------

@register_map_rule("aten.linear", "aten.matmul", "aten.mm", "aten.bmm", "aten.einsum", "aten.addmm", "aten.baddbmm",
                   "aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
                   "aten._grouped_mm", "transformers.grouped_mm_fallback", "autoperm.grouped_mm")
def _contraction(chk, node):
    """A letter of the space kept in the result comes from one factor (same role); a letter summed over pairs
    exactly two factors (one the dual of the other); additive terms (biases, masks) transform as the result."""
    chk.contraction(node)


@register_map_rule("aten.conv1d", "aten.conv2d", "aten.conv3d")
def _conv(chk, node):
    chk.convolution(node)
