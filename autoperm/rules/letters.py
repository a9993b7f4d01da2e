"""How ops index their operands, for deciding which inner groups may permute independently per block.

A spec may let an inner group (head dims, channels of a group) permute on its own inside every
block of another group (heads, groups): the wreath product. Whether an op allows it depends on
how it pairs indices, which the coupling rules do not record. Each entry here describes one op
family as a *signature* (see ``autoperm._blocks``):

- ``("move", )``: the op only moves, copies or broadcasts elements, each keeping its coordinates;
- ``("mix", x, dims)``: element-wise in ``x`` except along ``dims``, where it aggregates
  symmetrically (sums, means, norms, softmax, normalisation statistics);
- ``("letters", [(value, letters), ...], out_letters)``: an einsum-like contraction: axes with
  one letter share their index; letters missing from the output are summed over;
- ``("conv", x, weight, groups)`` and ``("group_norm", x, num_groups)``: their own checks;
- ``("pick", x, idx)``: ``x[idx]`` along axis 0, independent per block only as a pick of per-expert rows
  by a routing sort's sorted ids (checked with the MoE rules' records).

An op with no entry allows independent inner permutations only where it sees the block and inner
groups fused in one axis (then it treats that axis as one index); anywhere else the inner group
stays shared by all blocks.
"""
from __future__ import annotations

import string
from typing import Callable

import torch

from ._node import arg as _arg, reduced_dims as _dims, shape as _shape
from ._registry import NameTable

__all__ = ["register_letters", "get_letters"]

_SIGS = NameTable()


def register_letters(*names):
    """Register ``fn(node) -> signature`` for ops named ``aten.op`` (any overload) or ``aten.op.overload``."""
    return _SIGS.register(*names)


def get_letters(node) -> tuple | None:
    """The signature of a graph node, or None when its op has no entry (or the entry cannot read the node)."""
    fn = _SIGS.lookup(node)
    if fn is None:
        return None
    try:
        return fn(node)
    except Exception:  # noqa: BLE001 - an unreadable node keeps inner groups shared
        return None


_MOVE = """reshape view _unsafe_view reshape_as view_as _reshape_alias flatten unflatten permute transpose swapaxes
swapdims t numpy_T unsqueeze squeeze expand expand_as broadcast_to contiguous clone alias detach _to_copy to type_as
lift_fresh_copy unbind select slice slice_copy narrow split split_with_sizes split_with_sizes_copy chunk
tensor_split unsafe_split cat concat concatenate stack dropout native_dropout feature_dropout alpha_dropout
_assert_tensor_metadata"""
_POINTWISE = """relu relu_ gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid
hardsigmoid_ hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish mish_ softplus relu6 neg exp log
log1p expm1 sqrt rsqrt abs square sin cos erf reciprocal sign floor ceil round trunc frac clamp clamp_ clamp_min
clamp_min_ clamp_max clamp_max_ nan_to_num add add_ sub sub_ rsub mul mul_ div div_ maximum minimum pow where
masked_fill addcmul addcdiv lerp copy copy_ fill_ zero_ detach_"""


@register_letters(*(f"aten.{n}" for n in (_MOVE + " " + _POINTWISE).split()), "getitem")
def _move(node):
    """Every element keeps its coordinates (element-wise ops align axes; broadcasting copies)."""
    return ("move",)


@register_letters("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax", "aten.amin", "aten.logsumexp",
                  "aten.var.correction", "aten.std.correction", "aten.var_mean.correction",
                  "aten.std_mean.correction", "aten.var.dim", "aten.std.dim")
def _reduce(node):
    x = node.args[0]
    return ("mix", x, _dims(node, 1, "dim", len(_shape(x))))


@register_letters("aten.linalg_vector_norm", "aten.norm.ScalarOpt_dim")
def _norm(node):
    x = node.args[0]
    return ("mix", x, _dims(node, 2, "dim", len(_shape(x))))


@register_letters("aten.mean.default", "aten.sum.default", "aten.amax.default", "aten.amin.default")
def _reduce_all(node):
    x = node.args[0]
    return ("mix", x, list(range(len(_shape(x)))))


@register_letters("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten._safe_softmax")
def _softmax(node):
    x = node.args[0]
    return ("mix", x, [node.args[1] % len(_shape(x))])


@register_letters("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm")
def _layer_norm(node):
    x, k = node.args[0], len(node.args[1])
    n = len(_shape(x))
    return ("mix", x, list(range(n - k, n)))


def _fresh():
    pool = iter(f"_{i}" for i in range(10 ** 6))
    return lambda: next(pool)


@register_letters("aten.linear")
def _linear(node):
    x, w = node.args[0], node.args[1]
    b = _arg(node, 2, "bias")
    n = len(_shape(x))
    batch = [f"b{i}" for i in range(n - 1)]
    ops = [(x, batch + ["i"]), (w, ["o", "i"])] + ([(b, ["o"])] if isinstance(b, torch.fx.Node) else [])
    return ("letters", ops, batch + ["o"])


def _aligned(shape, letters, new):
    """Letters for an operand broadcast onto ``letters`` (aligned from the right; size-1 axes get their own)."""
    tail = letters[len(letters) - len(shape):] if len(shape) <= len(letters) else None
    if tail is None:
        raise ValueError("operand has more axes than the result")
    return [new() if s == 1 else l for s, l in zip(shape, tail)]


@register_letters("aten.matmul", "aten.mm", "aten.bmm")
def _matmul(node):
    a, b = node.args[0], node.args[1]
    sa, sb = _shape(a), _shape(b)
    new = _fresh()
    if len(sa) == 1 or len(sb) == 1:
        raise ValueError("matrix-vector product")
    n = max(len(sa), len(sb)) - 2
    batch = [f"B{i}" for i in range(n)]
    la = _aligned(sa[:-2], batch, new) + ["m", "k"]
    lb = _aligned(sb[:-2], batch, new) + ["k", "n"]
    out_shape = _shape(node)
    return ("letters", [(a, la), (b, lb)], [new() if s == 1 else l for s, l in zip(out_shape, batch + ["m", "n"])])


@register_letters("aten.addmm")
def _addmm(node):
    bias, a, b = node.args[:3]
    new = _fresh()
    return ("letters", [(bias, _aligned(_shape(bias), ["m", "n"], new)), (a, ["m", "k"]), (b, ["k", "n"])], ["m", "n"])


@register_letters("aten.baddbmm")
def _baddbmm(node):
    base, a, b = node.args[:3]
    new = _fresh()
    return ("letters", [(base, _aligned(_shape(base), ["B", "m", "n"], new)), (a, ["B", "m", "k"]), (b, ["B", "k", "n"])],
            ["B", "m", "n"])


@register_letters("aten.einsum")
def _einsum(node):
    eq, operands = node.args[0].replace(" ", ""), node.args[1]
    lhs, arrow, rhs = eq.partition("->")
    if "..." in eq or not arrow:
        raise ValueError("ellipsis or implicit output")
    new = _fresh()
    ops = [(op, [new() if s == 1 else c for c, s in zip(term, _shape(op))]) for term, op in zip(lhs.split(","), operands)]
    return ("letters", ops, [new() if s == 1 else c for c, s in zip(rhs, _shape(node))])


@register_letters("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu")
def _sdpa(node):
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    sq, sk, sv = _shape(q), _shape(k), _shape(v)
    if sq[:-2] != sk[:-2] or sq[:-2] != sv[:-2]:
        raise ValueError("broadcast or grouped heads")
    new = _fresh()
    batch = [new() if s == 1 else f"B{i}" for i, s in enumerate(sq[:-2])]
    ops = [(q, batch + ["t", "d"]), (k, batch + ["s", "d"]), (v, batch + ["s", "e"])]
    if isinstance(mask, torch.fx.Node):
        ops.append((mask, _aligned(_shape(mask), [f"B{i}" for i in range(len(batch))] + ["t", "s"], new)))
    return ("letters", ops, batch + ["t", "e"])


@register_letters("aten.conv1d", "aten.conv2d", "aten.conv3d")
def _conv(node):
    return ("conv", node.args[0], node.args[1], _arg(node, 6, "groups", 1))


@register_letters("aten.group_norm")
def _group_norm(node):
    return ("group_norm", node.args[0], node.args[1])


@register_letters("aten.native_group_norm")
def _native_group_norm(node):
    return ("group_norm", node.args[0], node.args[7])


@register_letters("aten._grouped_mm", "transformers.grouped_mm_fallback", "autoperm.grouped_mm")
def _grouped_mm(node):
    """2-D rows by 3-D expert weights with offsets: row r meets only expert e(r)'s weight, so the rows axis and the
    expert axis share the block letter ``r``. ``_blocks`` accepts a rows axis as a block axis only where the MoE
    rule proved the rows sorted by the ids that address the experts (``rules.moe.routed_rows``); anywhere else
    the rows carry no block and the inner group stays shared. 3-D by 3-D is a batched matmul."""
    x, w = node.args[0], node.args[1]
    offs = _arg(node, 2, "offs")
    bias = _arg(node, 3, "bias")
    if len(_shape(x)) == 3 and len(_shape(w)) == 3 and offs is None:
        ops, out = [(x, ["r", "m", "k"]), (w, ["r", "k", "n"])], ["r", "m", "n"]
    elif len(_shape(x)) == 2 and len(_shape(w)) == 3 and isinstance(offs, torch.fx.Node):
        ops, out = [(x, ["r", "k"]), (w, ["r", "k", "n"])], ["r", "n"]
    else:
        raise ValueError("grouped matmul of other ranks")
    if isinstance(bias, torch.fx.Node):
        ops.append((bias, ["r", "n"] if len(_shape(bias)) == 2 else ["n"]))
    return ("letters", ops, out)


@register_letters("aten.index.Tensor", "aten._unsafe_index.Tensor")
def _index(node):
    """``x[idx]`` along axis 0 by one index tensor: checked by ``_blocks`` only as a per-row pick of per-expert
    rows by a routing sort's sorted ids (row r takes expert e(r)'s row); any other indexing keeps inner groups shared."""
    x, idx = node.args[0], node.args[1]
    if len(idx) != 1 or not isinstance(idx[0], torch.fx.Node) or len(_shape(idx[0])) != 1:
        raise ValueError("not one 1-D index tensor on axis 0")
    return ("pick", x, idx[0])
