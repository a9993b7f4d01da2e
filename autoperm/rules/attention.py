"""Attention: q·kᵀ contracts the within-head axis, the weights contract the key axis with v."""
from __future__ import annotations

from ._registry import builtin_rule


def _tie_batch(ctx, lays, shapes, n):
    """Tie the leading (batch, head) axes of several operands, aligned from the right; size-1 broadcasts."""
    out = []
    for i in range(n):
        atoms = [lay[len(lay) - n + i] for lay, s in zip(lays, shapes) if len(lay) - n + i >= 0 and s[len(s) - n + i] != 1]
        for a in atoms[1:]:
            ctx.union(atoms[0], a)
        out.append(atoms[0] if atoms else None)
    return out


@builtin_rule("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu")
def sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q kᵀ · scale + mask) v: q[-1] ~ k[-1]; k[-2] ~ v[-2]; heads tie; out = (..., q[-2], v[-1]).

    Whole heads may move (the head axis is shared by q, k, v and the output). A causal
    mask depends on token positions, so ``is_causal`` pins the query and key axes.
    """
    lq, lk, lv = ctx.lay(q), ctx.lay(k), ctx.lay(v)
    sq, sk, sv = ctx.shape(q), ctx.shape(k), ctx.shape(v)
    nb = len(ctx.out_shape()) - 2
    if enable_gqa and sq[-3] != sk[-3]:
        for lay in (lq, lk, lv):
            ctx.pin(lay[-3], "grouped-query attention head axis")
    batch = _tie_batch(ctx, [lq[:-2], lk[:-2], lv[:-2]], [sq[:-2], sk[:-2], sv[:-2]], nb)
    ctx.union(lq[-1], lk[-1])
    ctx.union(lk[-2], lv[-2])
    if is_causal:
        ctx.pin(lq[-2], "causal attention (token positions matter)")
        ctx.pin(lk[-2], "causal attention (token positions matter)")
    if ctx.lay(attn_mask) is not None:
        logits = [a for a in batch] + [lq[-2], lk[-2]]
        lm, sm = ctx.lay(attn_mask), ctx.shape(attn_mask)
        for i in range(1, len(lm) + 1):
            if sm[-i] != 1:
                if logits[-i] is None:
                    logits[-i] = lm[-i]
                else:
                    ctx.union(logits[-i], lm[-i])
        batch = logits[:-2]
    out_shape = ctx.out_shape()
    head = tuple(b if b is not None else ctx.fresh(s) for b, s in zip(batch, out_shape[:nb]))
    res = head + (lq[-2], lv[-1])
    return res if not isinstance(out_shape, list) else [res] + [None] * (len(out_shape) - 1)


@builtin_rule("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten._safe_softmax")
def softmax(ctx, x, dim, *args, **kwargs):
    """softmax along an axis is permutation-equivariant along it: out ~ x."""
    return ctx.lay(x)
