"""Contractions: linear, matmul and friends, einsum. A contracted pair of axes shares one atom."""
from __future__ import annotations

from ._registry import builtin_rule


@builtin_rule("aten.linear")
def linear(ctx, x, weight, bias=None):
    """y[..., o] = W[o, i] x[..., i] + b[o]: x[-1] ~ W[1]; y[-1] ~ W[0] ~ b[0]."""
    lx, lw = ctx.lay(x), ctx.lay(weight)
    ctx.union(lx[-1], lw[1])
    if ctx.lay(bias) is not None:
        ctx.union(lw[0], ctx.lay(bias)[0])
    return lx[:-1] + (lw[0],)


def _batch(ctx, la, sa, lb, sb, out_batch_shape):
    """Broadcast batch axes of two operands (aligned from the right)."""
    out = []
    n = len(out_batch_shape)
    for i in range(n):
        ia, ib = i - (n - len(la)), i - (n - len(lb))
        a = la[ia] if ia >= 0 and sa[ia] != 1 else None
        b = lb[ib] if ib >= 0 and sb[ib] != 1 else None
        if a is not None and b is not None:
            ctx.union(a, b)
        out.append(a if a is not None else b if b is not None else ctx.fresh(out_batch_shape[i]))
    return tuple(out)


@builtin_rule("aten.matmul", "aten.mm", "aten.bmm")
def matmul(ctx, a, b):
    """a @ b: a[-1] ~ b[-2] (contracted); batch axes broadcast; out = batch + (a[-2], b[-1])."""
    la, lb, sa, sb = ctx.lay(a), ctx.lay(b), ctx.shape(a), ctx.shape(b)
    if len(la) == 1 and len(lb) == 1:
        ctx.union(la[0], lb[0])
        return ()
    if len(la) == 1:
        ctx.union(la[0], lb[-2])
        return lb[:-2] + (lb[-1],)
    if len(lb) == 1:
        ctx.union(la[-1], lb[0])
        return la[:-1]
    ctx.union(la[-1], lb[-2])
    out_shape = ctx.out_shape()
    return _batch(ctx, la[:-2], sa[:-2], lb[:-2], sb[:-2], out_shape[:-2]) + (la[-2], lb[-1])


@builtin_rule("aten.addmm")
def addmm(ctx, bias, a, b, **kw):
    """bias + a @ b: a[1] ~ b[0]; bias broadcasts onto (a[0], b[1])."""
    la, lb = ctx.lay(a), ctx.lay(b)
    ctx.union(la[1], lb[0])
    out = (la[0], lb[1])
    lbias, sb = ctx.lay(bias), ctx.shape(bias)
    for i in range(1, len(lbias) + 1):
        if sb[-i] != 1:
            ctx.union(lbias[-i], out[-i])
    return out


@builtin_rule("aten.baddbmm")
def baddbmm(ctx, base, a, b, **kw):
    """base + a @ b (batched): as matmul, base broadcast onto the product."""
    la, lb = ctx.lay(a), ctx.lay(b)
    ctx.union(la[2], lb[1])
    ctx.union(la[0], lb[0])
    out = (la[0], la[1], lb[2])
    lbase, sb = ctx.lay(base), ctx.shape(base)
    for i in range(1, len(lbase) + 1):
        if sb[-i] != 1:
            ctx.union(lbase[-i], out[-i])
    return out


@builtin_rule("aten.einsum")
def einsum(ctx, equation, operands, path=None):
    """einsum: every occurrence of one index letter shares an atom (broadcast size-1 axes excepted)."""
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    letter: dict[str, int] = {}
    ell = None
    for term, op in zip(terms, operands):
        lay, shp = ctx.lay(op), ctx.shape(op)
        if "..." in term:
            pre, post = term.split("...")
            nell = len(lay) - len(pre) - len(post)
            names = list(pre) + [f"...{i}" for i in range(nell)] + list(post)
            ell = nell if ell is None else max(ell, nell)
        else:
            names = list(term)
        for n, a, s in zip(names, lay, shp):
            if s == 1:
                continue
            if n in letter:
                ctx.union(letter[n], a)
            else:
                letter[n] = a
    if not rhs and "->" not in eq:
        counts = {c: lhs.count(c) for c in set(lhs.replace(",", "").replace(".", ""))}
        rhs = ("..." if ell else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    out_names = []
    if "..." in rhs:
        pre, post = rhs.split("...")
        out_names = list(pre) + [f"...{i}" for i in range(ell or 0)] + list(post)
    else:
        out_names = list(rhs)
    shape = ctx.out_shape()
    return tuple(letter.get(n, None) if letter.get(n) is not None and ctx.size(letter[n]) == s else ctx.fresh(s)
                 for n, s in zip(out_names, shape))
