"""Mixture-of-experts routing: top-k choice of experts, histograms of expert ids, grouped matmuls.

Expert ids are id tensors (see ``_ids``): ``topk`` over the router's expert axis E returns indices
whose values address E. Indexing per-expert weights with them ties the weights' expert axis to E;
so does the grouped matmul of rows sorted by expert id, whose group offsets are the running sum of
a histogram of the sorted ids. Sorting ids moves rows in an order that depends on the ids: the
sorted rows carry an atom of their own, allowed only when every op downstream of the sort treats
rows alike until the inverse permutation puts them back (checked by ``_routed_region``); otherwise
the sorted axis is pinned as before, and so is the expert axis of a grouped matmul.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ._ids import address, domain, drop, id_aware, set_domain, source, used_as_ids
from ._registry import builtin_rule, get_rule, register_rule
from .elementwise import BINARY, UNARY


def _name(node) -> str:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def _d(d, n):
    return d + n if d < 0 else d


@builtin_rule("aten.topk")
def topk(ctx, x, k, dim=-1, largest=True, sorted=True):
    """(values, indices) of the k largest along ``dim``: both have x's other axes and a pinned rank axis; the
    indices' values address x[dim], which is not pinned (permuting it relabels the indices, the values stay;
    ties aside) when every use of the indices reads them as ids; else x[dim] is pinned. An unsorted top-k
    returns its k entries in an order the implementation chooses: a model whose outputs depend on that order has
    no well-defined function, so the rank axis is treated as for a sorted top-k."""
    lay = ctx.lay(x)
    d = _d(dim, len(lay))
    if used_as_ids(ctx.node, (ctx.node, 1)):
        set_domain(ctx, (ctx.node, 1), lay[d])
    else:
        ctx.pin(lay[d], "top-k indices read as numbers")
    out = lay[:d] + (ctx.fresh(k, f"top-k rank axis at {ctx.where}"),) + lay[d + 1:]
    return [out, out]


@builtin_rule("aten.histc")
@id_aware
def histc(ctx, x, bins=100, min=0, max=0):
    """A histogram is symmetric in its input's positions (they vanish). Its bins are pinned, unless x holds ids
    of a known domain of ``bins`` entries binned one per id (min 0, max bins-1): then counts' = counts∘π⁻¹."""
    dom = domain(ctx, x)
    if dom is not None and ctx.size(dom) == bins and min == 0 and max == bins - 1:
        return (dom,)
    drop(ctx, x, "histogram of ids with other bins")
    return (ctx.fresh(bins, f"histogram bins at {ctx.where}"),)


@builtin_rule("aten.bincount")
@id_aware
def bincount(ctx, x, weights=None, minlength=0):
    """Counts per id: x's axis ~ weights' axis (they vanish); bins ~ the ids' domain when its size matches."""
    if ctx.lay(weights) is not None:
        ctx.union(ctx.lay(x)[0], ctx.lay(weights)[0])
    n = ctx.out_shape()[0]
    dom = domain(ctx, x)
    if dom is not None and ctx.size(dom) == n:
        return (dom,)
    drop(ctx, x, "bincount of ids with another number of bins")
    return (ctx.fresh(n, f"histogram bins at {ctx.where}"),)


# -- sorting expert ids ---------------------------------------------------------------------------
_sort = get_rule(torch.ops.aten.sort.default)
_cumsum = get_rule(torch.ops.aten.cumsum.default)
_GROUPED = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _sorts(ctx) -> dict:
    s = getattr(ctx, "routing_sorts", None)
    if s is None:
        s = ctx.routing_sorts = {}
    return s


@register_rule("aten.sort.default", override=True)
@id_aware
def sort(ctx, x, dim=-1, descending=False):
    """Sorting expert ids (1-D, values of a known domain D, ascending) to group rows by expert: the sorted axis
    gets an atom R of its own (rows move by an order that permuting D induces); values keep domain D, indices
    address x's axis. Allowed only when ``_routed_region`` proves every use treats rows alike until they are
    put back. Otherwise (any other sort): the sorted axis is pinned."""
    lay = ctx.lay(x)
    dom = domain(ctx, x)
    node = ctx.node
    if (len(lay) == 1 and not descending and dom is not None and _routed_region(node)
            and used_as_ids(node, (node, 0))):
        r = ctx.fresh(ctx.size(lay[0]))
        set_domain(ctx, (node, 0), dom)
        if used_as_ids(node, (node, 1)):
            set_domain(ctx, (node, 1), lay[0])
        else:  # the permutation is read as numbers (e.g. token = slot // k): its values must not change
            ctx.pin(lay[0], "sorted positions read as numbers")
        _sorts(ctx)[node] = (dom, r)
        return [(r,), (r,)]
    drop(ctx, x, "ids sorted outside a routing pattern")
    return _sort(ctx, x, dim, descending)


register_rule("aten.sort.stable", override=True)(lambda ctx, x, *, stable=None, dim=-1, descending=False: sort(ctx, x, dim, descending))


def routed_rows(ctx) -> dict:
    """``{grouped matmul node: (rows atom R, expert atom E)}`` where the rule proved that row r of the sorted rows
    meets only the weight of its own expert e(r): R's rows are the sort's, the offsets count its sorted ids."""
    s = getattr(ctx, "routed", None)
    if s is None:
        s = ctx.routed = {}
    return s


def _offsets_of(offs):
    """The sort node whose sorted ids ``offs`` counts (offs = cumsum(histc|bincount(sorted ids))), else None."""
    c = source(offs)
    if not (isinstance(c, Node) and _name(c) == "cumsum" and _d(c.args[1], 1) == 0):
        return None
    h = source(c.args[0])
    if not (isinstance(h, Node) and _name(h) in ("histc", "bincount")):
        return None
    v = source(h.args[0])
    return v[0] if isinstance(v, tuple) and v[1] == 0 and _name(v[0]) == "sort" else None


@register_rule("aten.cumsum.default", override=True)
def cumsum(ctx, x, dim, *args, **kwargs):
    """Scans depend on order along ``dim``: pinned. Except the group offsets of a grouped matmul (a running sum
    of the histogram of sorted expert ids, read only by grouped matmuls, whose rules check the pattern): the
    histogram's expert axis is not pinned, and the offsets carry a fresh atom no other op reads."""
    if _offsets_of(ctx.node) in _sorts(ctx) and _only_grouped_offsets(ctx.node):
        return ctx.fresh_layout(ctx.out_shape())
    return _cumsum(ctx, x, dim, *args, **kwargs)


def _only_grouped_offsets(node) -> bool:
    """True when every use of ``node`` (through value-preserving casts) is as the offsets of a grouped matmul."""
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if _name(u) in ("to", "_to_copy", "clone"):
                stack.append(u)
            elif _name(u) == "_assert_tensor_metadata":
                pass
            elif _name(u) in _GROUPED and _offs_arg(u) is n:
                pass
            else:
                return False
    return True


def _offs_arg(node):
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")


# -- grouped matmul -------------------------------------------------------------------------------
def _grouped(ctx, x, w, offs=None, bias=None, out_dtype=None):
    """out[r] = x[r] @ W[e(r)], row r in expert e(r)'s segment of ``offs``: x[-1] ~ W[-2], out[-1] ~ W[-1]
    (one permutation for every expert). The expert axis W[0] ~ the ids' domain D when ``offs`` counts the sorted
    ids the rows of x were sorted by (the rows carry that sort's atom); otherwise W[0] and x's rows are pinned.
    3-D × 3-D (no offsets) is a batched matmul: x[0] ~ W[0]."""
    lx, lw = ctx.lay(x), ctx.lay(w)
    ctx.union(lx[-1], lw[-2])
    if len(lx) == 3 and offs is None:
        ctx.union(lx[0], lw[0])
        out = (lx[0], lx[1], lw[2])
    elif len(lx) == 2 and len(lw) == 3 and offs is not None:
        s = _offsets_of(offs)
        entry = _sorts(ctx).get(s) if s is not None else None
        if entry is not None and ctx.atoms.find(lx[0]) == ctx.atoms.find(entry[1]) and ctx.size(entry[0]) == ctx.size(lw[0]):
            ctx.union(lw[0], entry[0])
            routed_rows(ctx)[ctx.node] = (entry[1], lw[0])
        else:
            if entry is not None:  # the sort's rows move with its ids' domain: keep it still
                ctx.pin(entry[0], "expert ids of a grouped matmul whose rows are not the sorted rows")
            ctx.pin(lw[0], "expert axis addressed by group offsets")
            ctx.pin(lx[0], "rows grouped by offsets")
            ctx.pin_layout(ctx.lay(offs), "group offsets")
        out = (lx[0], lw[2])
    else:
        raise NotImplementedError(f"grouped matmul of {len(lx)}-D by {len(lw)}-D")
    lb = ctx.lay(bias)
    if lb is not None:
        ctx.union(lb[-1], out[-1])
        if len(lb) == 2:
            ctx.union(lb[0], lw[0])
    return out


builtin_rule("aten._grouped_mm")(_grouped)
builtin_rule("transformers.grouped_mm_fallback", "autoperm.grouped_mm")(_grouped)


# -- the inverse of a sort permutation ------------------------------------------------------------
def _is_arange(n, size) -> bool:
    return (isinstance(n, Node) and _name(n) == "arange" and len(n.args) == 1 and n.args[0] == size
            and not n.kwargs.get("dtype", None) in (torch.bool,))


@builtin_rule("aten.index_put", "aten.index_put_")
@id_aware
def index_put(ctx, x, indices, values, accumulate=False):
    """out = x with out[indices] = values. ``inv[perm] = arange(n)`` with ``perm`` the indices of a routing sort
    builds the inverse permutation: its axis is the sort's input axis, its values address the sorted axis R.
    Otherwise: the written axes are pinned (tied to the indices' id domain when known), the index tensors and the
    values' index axes pinned, the values' trailing axes ~ x's trailing axes."""
    lay = ctx.lay(x)
    used = [i for i, t in enumerate(indices) if t is not None]
    if (len(indices) == 1 and used == [0] and not accumulate and len(lay) == 1 and _is_arange(values, ctx.shape(x)[0])):
        p = source(indices[0])
        if isinstance(p, tuple) and p[1] == 1 and p[0] in _sorts(ctx):
            dom, r = _sorts(ctx)[p[0]]
            if used_as_ids(ctx.node):
                set_domain(ctx, ctx.node, r)
            else:
                ctx.pin(dom, "inverse routing permutation read as numbers")
            return (ctx.lay(p[0].args[0])[0],)
    for d in used:
        if _is_bool(indices[d]):
            raise NotImplementedError("index_put with boolean masks")
        address(ctx, lay[d], indices[d], "axis written at positions of an index tensor")
        ctx.pin_layout(ctx.lay(indices[d]), "index tensor of index_put")
    lv, sv = ctx.lay(values), ctx.shape(values)
    if lv is not None:
        trail = len(lay) - (used[-1] + 1) if used else len(lay)
        for i in range(1, len(lv) + 1):
            if i <= trail and sv[-i] == ctx.shape(x)[-i]:
                ctx.union(lv[-i], lay[-i])
            elif sv[-i] != 1:
                ctx.pin(lv[-i], "values written at positions of an index tensor")
    return lay


def _is_bool(t) -> bool:
    return isinstance(t, Node) and t.meta["val"].dtype == torch.bool


# -- the region of a routing sort -----------------------------------------------------------------
_CASTS = {"to", "_to_copy", "clone", "contiguous", "alias", "detach", "lift_fresh_copy"}
_ROWWISE_DIM = {"chunk", "split", "split_with_sizes", "slice", "narrow", "softmax", "_softmax", "log_softmax",
                "unsqueeze", "select", "unbind"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}


def _routed_region(sort_node: Node) -> bool:
    """True when every op reached from the sort's outputs keeps rows apart and in step (row-wise ops, indexing
    other tensors by the sorted rows, grouped matmuls with this sort's offsets, histograms) until an index by
    the inverse permutation puts rows back in their original order. Only then may the sorted axis move."""
    rows = int(sort_node.meta["val"][0].shape[0])
    region: set = set()
    inverses: set = set()

    def rowed(n) -> bool:
        v = n.meta.get("val") if isinstance(n, Node) else None
        return isinstance(v, torch.Tensor) and v.dim() >= 1 and int(v.shape[0]) == rows

    after = False
    for u in sort_node.graph.nodes:
        if u is sort_node:
            after = True
            continue
        ins = [a for a in u.all_input_nodes if a in region or a is sort_node]
        if not after or not ins:
            continue
        n = ins[0]
        name = _name(u)
        val = u.meta.get("val")
        ok = False
        if n is sort_node:
            ok = u.target is operator.getitem and len(ins) == 1
        elif u.target is operator.getitem or name in _CASTS:
            ok = len(ins) == 1
        elif name == "_assert_tensor_metadata":
            continue
        elif name in ("histc", "bincount", "empty_like", "zeros_like", "ones_like", "full_like"):
            if u.args[0] is n and len(ins) == 1:
                continue  # symmetric in rows / shape only: leaves the region
        elif name in _GROUPED:
            ok = ins == [u.args[0]] and _offsets_of(_offs_arg(u)) is sort_node
        elif name in ("index", "_unsafe_index"):
            x, idx = u.args[0], u.args[1]
            if x in region:
                if len(ins) == 1 and len(idx) == 1 and isinstance(idx[0], Node) and source(idx[0]) in inverses:
                    continue  # rows put back: leaves the region
            else:
                ok = len(idx) == 1 and idx[0] is n and len(ins) == 1 and n.meta["val"].dim() == 1
        elif name in ("index_put", "index_put_"):
            if (len(ins) == 1 and u.args[1] is not None and len(u.args[1]) == 1 and u.args[1][0] is n
                    and source(n) == (sort_node, 1) and _is_arange(u.args[2], rows)):
                inverses.add(u)
                continue
        elif name in UNARY or name in BINARY:
            tensors = [a for a in list(u.args) + list(u.kwargs.values()) if isinstance(a, Node)]
            out_dim = val.dim() if isinstance(val, torch.Tensor) else 0
            ok = all(t in region or _broadcast_on_rows(t, out_dim) for t in tensors) and rowed(u)
        elif name in _ROWWISE_DIM and len(ins) == 1:
            at = 2 if name in ("chunk", "split", "split_with_sizes") else 1
            dim = u.args[at] if len(u.args) > at else u.kwargs.get("dim", 0)
            ok = isinstance(dim, int) and _d(dim, n.meta["val"].dim() + (name == "unsqueeze")) != 0
        elif name in ("view", "reshape", "_unsafe_view"):
            ok = rowed(u) and len(ins) == 1
        elif name == "linear":
            ok = ins == [u.args[0]] and n.meta["val"].dim() >= 2
        elif name in _NORMS:  # normalizes trailing axes only, never the rows
            ok = ins == [u.args[0]] and len(u.args[1]) < n.meta["val"].dim()
        if not ok:
            return False
        region.add(u)
    return True


def _broadcast_on_rows(t: Node, out_dim: int) -> bool:
    """A tensor operand that is the same for every row (no row axis after broadcasting)."""
    v = t.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return True
    return v.dim() < out_dim or int(v.shape[0]) == 1
