"""Data movement: reshape, permute, concat, split, slicing, expand. Atoms move with the axes they describe."""
from __future__ import annotations

from .._atoms import Stacked
from ._registry import builtin_rule


def _dim(d, n):
    return d + n if d < 0 else d


_PASS = {"aten.permute", "aten.transpose", "aten.contiguous", "aten.clone", "aten.alias"}


def _selected_axis(node, axis):
    """Follow ``node``'s users through permutes; the axis ``axis`` ends up at, if every path ends in unbind/select of it."""
    import torch
    hits = []
    for u in node.users:
        name = f"aten.{u.target._opname}" if isinstance(u.target, torch._ops.OpOverload) else ""
        n = len(node.meta["val"].shape)
        if name == "aten.permute":
            hits.append(_selected_axis(u, [d % n for d in u.args[1]].index(axis)))
        elif name == "aten.transpose":
            d0, d1 = u.args[1] % n, u.args[2] % n
            hits.append(_selected_axis(u, d1 if axis == d0 else d0 if axis == d1 else axis))
        elif name in _PASS:
            hits.append(_selected_axis(u, axis))
        elif name == "aten.unsqueeze":
            d = u.args[1] % (n + 1)
            hits.append(_selected_axis(u, axis + 1 if d <= axis else axis))
        elif name == "aten.squeeze":
            drop = _squeezed(u.args[1] if len(u.args) > 1 else None, node.meta["val"].shape)
            hits.append(axis not in drop and _selected_axis(u, axis - sum(d < axis for d in drop)))
        elif name in ("aten.unbind", "aten.select"):
            dim = (u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)) % n
            hits.append(dim == axis)
        else:
            hits.append(False)
    return bool(hits) and all(hits)


def reshape_layout(ctx, lay, in_shape, out_shape, stack_at=None):
    """Map atoms through a reshape: merged axes form products, split axes factor their atom.

    With ``stack_at`` (an output axis that leads a split and is later unbound), the split atom is
    cut into one slice per index of that axis, each with its own factors; returns a ``Stacked``.
    """
    stacked = None
    ins = [(a, s) for a, s in zip(lay, in_shape) if s != 1]
    outs = [i for i, s in enumerate(out_shape) if s != 1]
    out = [ctx.fresh(1) if s == 1 else None for s in out_shape]
    i = j = 0
    while i < len(ins):
        gi, pi = [ins[i][0]], ins[i][1]
        gj, pj = [outs[j]], out_shape[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(ins[i][0]); pi *= ins[i][1]; i += 1
            else:
                gj.append(outs[j]); pj *= out_shape[outs[j]]; j += 1
        src = gi[0] if len(gi) == 1 else ctx.prod(gi)
        if stack_at is not None and len(gj) > 1 and gj[0] == stack_at:
            k, rest = out_shape[gj[0]], [out_shape[i] for i in gj[1:]]
            slices = ctx.split_cat(src, [pj // k] * k, "reshape of a fused axis")
            stacked = (gj, [ctx.split_prod(sl, rest, "reshape of a fused axis") for sl in slices])
            continue
        parts = [src] if len(gj) == 1 else ctx.split_prod(src, [out_shape[k] for k in gj], "reshape")
        for k, p in zip(gj, parts):
            out[k] = p
    if stacked is None:
        return tuple(out)
    gj, per_slice = stacked
    sel = ctx.fresh(out_shape[gj[0]], f"slices of a fused axis taken apart at {ctx.where}")
    parts = []
    for atoms in per_slice:
        part = list(out)
        part[gj[0]] = sel
        for k, a in zip(gj[1:], atoms):
            part[k] = a
        parts.append(tuple(part))
    return Stacked(gj[0], parts)


@builtin_rule("aten.reshape", "aten.view", "aten._unsafe_view", "aten.reshape_as", "aten.view_as",
               "aten._reshape_alias")
def reshape(ctx, x, *args, **kwargs):
    """Reshape: axes merged into one carry the product of their atoms; a split axis is factored.

    A split (k, ...) whose k slices are later unbound (fused qkv) gives each slice its own atoms.
    """
    out_shape = ctx.out_shape()
    stack_at = next((i for i, s in enumerate(out_shape) if s > 1 and _selected_axis(ctx.node, i)), None)
    return reshape_layout(ctx, ctx.lay(x), ctx.shape(x), out_shape, stack_at)


@builtin_rule("aten.flatten")
def flatten(ctx, x, start_dim=0, end_dim=-1):
    """Flatten: the merged axis carries prod[atoms of the merged axes] (channel × spatial)."""
    return reshape_layout(ctx, ctx.lay(x), ctx.shape(x), ctx.out_shape())


@builtin_rule("aten.unflatten")
def unflatten(ctx, x, dim, sizes):
    """Unflatten: the axis is factored into the new sizes (a leading split later unbound: as reshape)."""
    return reshape(ctx, x)


@builtin_rule("aten.permute")
def permute(ctx, x, dims):
    """Axes reorder; atoms move with them."""
    st = ctx.stacked(x)
    if st is not None:
        n = len(st.parts[0])
        dims = [_dim(d, n) for d in dims]
        return _restack(st, dims.index(st.axis), [tuple(p[d] for d in dims) for p in st.parts])
    lay = ctx.lay(x)
    return tuple(lay[_dim(d, len(lay))] for d in dims)


def _restack(st, axis, parts):
    return Stacked(axis, parts)


@builtin_rule("aten.transpose", "aten.swapaxes", "aten.swapdims")
def transpose(ctx, x, d0, d1):
    """Two axes swap; atoms move with them."""
    st = ctx.stacked(x)
    if st is not None:
        n = len(st.parts[0])
        dims = list(range(n))
        dims[_dim(d0, n)], dims[_dim(d1, n)] = dims[_dim(d1, n)], dims[_dim(d0, n)]
        return permute(ctx, x, dims)
    lay = list(ctx.lay(x))
    d0, d1 = _dim(d0, len(lay)), _dim(d1, len(lay))
    lay[d0], lay[d1] = lay[d1], lay[d0]
    return tuple(lay)


@builtin_rule("aten.t", "aten.numpy_T")
def t(ctx, x):
    """Matrix transpose."""
    return tuple(reversed(ctx.lay(x)))


@builtin_rule("aten.unsqueeze")
def unsqueeze(ctx, x, dim):
    """A new size-1 axis."""
    st = ctx.stacked(x)
    n = len(st.parts[0]) if st is not None else len(ctx.lay(x))
    d = _dim(dim, n + 1)
    one = ctx.fresh(1)
    if st is not None:  # a fused axis still to be taken apart keeps its slices
        return _restack(st, st.axis + (d <= st.axis), [p[:d] + (one,) + p[d:] for p in st.parts])
    lay = ctx.lay(x)
    return lay[:d] + (one,) + lay[d:]


def _squeezed(dim, shape) -> set:
    n = len(shape)
    dims = range(n) if dim is None else [dim] if isinstance(dim, int) else dim
    return {_dim(d, n) for d in dims if shape[_dim(d, n)] == 1}


@builtin_rule("aten.squeeze")
def squeeze(ctx, x, dim=None):
    """Size-1 axes (all, or those named) vanish."""
    drop = _squeezed(dim, ctx.shape(x))
    st = ctx.stacked(x)
    if st is not None and st.axis not in drop:
        return _restack(st, st.axis - sum(d < st.axis for d in drop),
                        [tuple(a for i, a in enumerate(p) if i not in drop) for p in st.parts])
    return tuple(a for i, a in enumerate(ctx.lay(x)) if i not in drop)


def _expand(ctx, x):
    lay, shp, out = ctx.lay(x), ctx.shape(x), ctx.out_shape()
    lead = len(out) - len(lay)
    # A broadcast axis holds identical values along it, so any permutation of it is harmless: free atom.
    return tuple(ctx.fresh(out[i]) for i in range(lead)) + tuple(
        ctx.fresh(out[lead + i]) if s == 1 and out[lead + i] != 1 else a for i, (a, s) in enumerate(zip(lay, shp)))


@builtin_rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def expand(ctx, x, *args, **kwargs):
    """Expand size-1 axes: the new extent is constant along the axis, so its atom is free."""
    return _expand(ctx, x)


@builtin_rule("aten.repeat", "aten.tile")
def repeat(ctx, x, repeats):
    """Tile: index t*n + i carries prod[free tile atom, x's atom] (tiles are identical copies)."""
    lay, out = ctx.lay(x), ctx.out_shape()
    lead = len(out) - len(lay)
    res = [ctx.fresh(s) for s in out[:lead]]
    for a, s in zip(lay, out[lead:]):
        r = s // ctx.size(a) if ctx.size(a) else 1
        res.append(a if r == 1 else ctx.prod([ctx.fresh(r), a]))
    return tuple(res)


@builtin_rule("aten.repeat_interleave.self_int")
def repeat_interleave(ctx, x, repeats, dim=None, output_size=None):
    """Each element repeated r times along ``dim``: prod[x's atom, free copy atom]."""
    lay = list(ctx.lay(x))
    if dim is None:
        ctx.pin_layout(lay, "repeat_interleave over a flattened tensor")
        return ctx.pinned_layout(ctx.out_shape(), "repeat_interleave over a flattened tensor")
    d = _dim(dim, len(lay))
    lay[d] = ctx.prod([lay[d], ctx.fresh(repeats)])
    return tuple(lay)


@builtin_rule("aten.cat", "aten.concat", "aten.concatenate")
def cat(ctx, tensors, dim=0):
    """Concatenate: other axes tie; the joined axis carries cat[inputs' atoms] (offsets)."""
    items = [t for t in tensors if ctx.lay(t) is not None and not (len(ctx.shape(t)) == 1 and ctx.shape(t)[0] == 0)]
    lays = [ctx.lay(t) for t in items]
    n = len(lays[0])
    d = _dim(dim, n)
    for lay in lays[1:]:
        for i in range(n):
            if i != d:
                ctx.union(lays[0][i], lay[i])
    return tuple(ctx.cat([lay[d] for lay in lays]) if i == d else lays[0][i] for i in range(n))


@builtin_rule("aten.stack")
def stack(ctx, tensors, dim=0):
    """Stack: inputs tie axis by axis; the new axis indexes the inputs and is pinned."""
    lays = [ctx.lay(t) for t in tensors]
    for lay in lays[1:]:
        ctx.unify(lays[0], lay)
    out = list(lays[0])
    out.insert(_dim(dim, len(out) + 1), ctx.fresh(len(lays), f"stack axis at {ctx.where}"))
    return tuple(out)


def _pieces(ctx, x, dim, sizes):
    lay = ctx.lay(x)
    d = _dim(dim, len(lay))
    parts = ctx.split_cat(lay[d], sizes, "split")
    return [lay[:d] + (p,) + lay[d + 1:] for p in parts]


@builtin_rule("aten.split_with_sizes", "aten.split_with_sizes_copy")
def split_with_sizes(ctx, x, split_sizes, dim=0):
    """Split: each piece's axis is the matching slice cat-piece of the input atom."""
    return _pieces(ctx, x, dim, split_sizes)


@builtin_rule("aten.split.Tensor", "aten.chunk", "aten.tensor_split.sections", "aten.unsafe_split.Tensor",
               "aten.unsafe_chunk")
def split(ctx, x, size_or_chunks, dim=0):
    """Split / chunk into equal pieces (sizes read off the outputs)."""
    d = _dim(dim, len(ctx.lay(x)))
    return _pieces(ctx, x, dim, [s[d] for s in ctx.out_shape()])


@builtin_rule("aten.unbind")
def unbind(ctx, x, dim=0):
    """Unbind: the axis selects which output, so its atom is pinned; other axes pass through.

    A stacked input (fused qkv) hands each output its own slice's atoms.
    """
    st = ctx.stacked(x)
    if st is not None and _dim(dim, len(st.parts[0])) == st.axis:
        return [p[:st.axis] + p[st.axis + 1:] for p in st.parts]
    lay = ctx.lay(x)
    d = _dim(dim, len(lay))
    ctx.pin(lay[d], "axis indexed by unbind")
    return [lay[:d] + lay[d + 1:] for _ in range(ctx.shape(x)[d])]


@builtin_rule("aten.select")
def select(ctx, x, dim, index):
    """Select one index: the axis is pinned (a position is read) and removed."""
    st = ctx.stacked(x)
    if st is not None and _dim(dim, len(st.parts[0])) == st.axis:
        p = st.parts[index]
        return p[:st.axis] + p[st.axis + 1:]
    lay = ctx.lay(x)
    d = _dim(dim, len(lay))
    ctx.pin(lay[d], "axis indexed by select")
    return lay[:d] + lay[d + 1:]


@builtin_rule("aten.slice.Tensor", "aten.slice_copy.Tensor")
def slice_(ctx, x, dim=0, start=None, end=None, step=1):
    """Slice [start:end:step]: a contiguous slice is a cat-piece of the atom. A strided slice ``lo::step`` over the
    whole axis (size a multiple of step) reads offset lo of each group of step: the axis is prod[groups, offsets]
    with the offsets pinned, the groups passing to the output; other strided slices pin the axis."""
    lay = list(ctx.lay(x))
    d = _dim(dim, len(lay))
    n = ctx.shape(x)[d]
    lo, hi, _ = slice(start, end).indices(n)
    hi = max(hi, lo)
    if (lo, hi, step) == (0, n, 1):
        return tuple(lay)
    if step != 1 and n % step == 0 and lo < step and hi > n - step:  # x[lo::step]: offset lo of each group
        whole, offset = ctx.split_prod(lay[d], [n // step, step], "strided slice")
        ctx.pin(offset, "strided slice picks one offset in each group")
        lay[d] = whole
        return tuple(lay)
    if step != 1:
        ctx.pin(lay[d], "strided slice")
        lay[d] = ctx.fresh(ctx.out_shape()[d], f"strided slice at {ctx.where}")
        return tuple(lay)
    lay[d] = ctx.split_cat(lay[d], [lo, hi - lo, n - hi], "slice")[1]
    return tuple(lay)


@builtin_rule("aten.narrow")
def narrow(ctx, x, dim, start, length):
    """narrow = a contiguous slice."""
    return slice_(ctx, x, dim, start, start + length)


def _pin_axes(ctx, x, dims, why):
    lay = ctx.lay(x)
    for d in (range(len(lay)) if dims is None else [dims] if isinstance(dims, int) else dims):
        ctx.pin(lay[_dim(d, len(lay))], why)
    return lay


@builtin_rule("aten.roll")
def roll(ctx, x, shifts, dims=()):
    """Roll moves positions along its axes (all axes when none given): pin them."""
    return _pin_axes(ctx, x, list(dims) or None, "rolled axis")


@builtin_rule("aten.flip")
def flip(ctx, x, dims):
    """Flip reverses positions along its axes: pin them."""
    return _pin_axes(ctx, x, dims, "flipped axis")


@builtin_rule("aten.cumsum", "aten.cumprod", "aten.logcumsumexp")
def cumulative(ctx, x, dim, *args, **kwargs):
    """Scans depend on order along ``dim``: pin it."""
    return _pin_axes(ctx, x, dim, "scanned axis")


@builtin_rule("aten.diff")
def diff(ctx, x, n=1, dim=-1, prepend=None, append=None):
    """Differences of neighbours along ``dim`` (positions matter: pinned, out[dim] pinned); other axes ~ out."""
    lay = _pin_axes(ctx, x, dim, "differenced axis")
    d = _dim(dim, len(lay))
    for extra in (prepend, append):
        if ctx.lay(extra) is not None:
            le = ctx.lay(extra)
            ctx.pin(le[d], "differenced axis")
            ctx.unify(lay[:d] + lay[d + 1:], le[:d] + le[d + 1:])
    return lay[:d] + (ctx.fresh(ctx.out_shape()[d], f"differenced axis at {ctx.where}"),) + lay[d + 1:]


@builtin_rule("aten.sort")
def sort(ctx, x, dim=-1, descending=False):
    """Sort returns (values, indices) ordered along ``dim``: pin it."""
    lay = _pin_axes(ctx, x, dim, "sorted axis")
    return [lay, lay]


@builtin_rule("aten.unfold")
def unfold(ctx, x, dim, size, step):
    """Sliding windows: out[.., i, .., j] = x[.., i*step + j, ..]; other axes ~ x.

    ``dim`` mixes window and offset positions: x[dim], out[dim] and the new trailing axis are
    pinned, except the two trivial cases where one window covers the axis (trailing ~ x[dim]) or
    windows have size 1 and step 1 (out[dim] ~ x[dim])."""
    lay = list(ctx.lay(x))
    d = _dim(dim, len(lay))
    n, out = ctx.shape(x)[d], ctx.out_shape()
    if size == n:
        lay[d], tail = ctx.fresh(1), lay[d]
    elif size == 1 and step == 1:
        tail = ctx.fresh(1)
    else:
        ctx.pin(lay[d], "unfolded (windowed) axis")
        lay[d] = ctx.fresh(out[d], f"unfolded (windowed) axis at {ctx.where}")
        tail = ctx.fresh(size, f"window axis of unfold at {ctx.where}")
    return tuple(lay) + (tail,)


@builtin_rule("aten.meshgrid")
def meshgrid(ctx, tensors, indexing="ij"):
    """Grids: out_k = x_k (1-D) expanded; out_k[v_k] ~ x_k[0] with v_k = k ('ij'; 'xy' swaps the first two),
    every other axis of out_k is a broadcast (constant) axis, so its atom is free."""
    shapes = ctx.out_shape()
    n = len(tensors)
    outs = []
    for k, (t, shp) in enumerate(zip(tensors, shapes)):
        v = (1 - k if k < 2 else k) if indexing == "xy" and n >= 2 else k
        lay = ctx.lay(t)
        src = lay[0] if lay else ctx.fresh(1)
        outs.append(tuple(src if i == v else ctx.fresh(s) for i, s in enumerate(shp)))
    return outs
