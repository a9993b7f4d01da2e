"""Rotary maps: under rotary position embeddings, each frequency pair of a query/key head may rotate by an
angle of its own (a product of SO(2)s), shared by the query heads of a key/value group and their key head.

RoPE (the ``rotate_half`` form) computes ``x·cos + rotate_half(x)·sin`` with
``rotate_half(x) = cat(-x[..., h:], x[..., :h])``: a rotation of each plane ``(i, i + h)`` by an angle that
depends on the position. Rotations of one plane commute, so a fixed rotation of every plane commutes with
RoPE, provided ``cos`` and ``sin`` take one value on both units of a pair. That is proven from the graph:
both come, through element-wise functions, scalings and moves that keep the last axis, from
``cat(f, f)`` along it (``f`` one node, concatenated with itself).

The rest of the graph is checked as for every other map (``autoperm.maps.infer.Checker``) on the half atom,
with the RoPE nodes and their ``cos``/``sin`` inputs set aside and one more rule: every other op must see the
two halves of the head dim together (nothing takes one half alone). Independence per key/value head is
checked op by op with the per-block rules of ``autoperm._blocks``.
"""
from __future__ import annotations

from .._blocks import _node_ok, _tensors
from .map import Map, MapPin
from .rules import op_names

__all__ = ["rotary_maps"]

_BIG = 1 << 62
_UNARY = {"aten.cos", "aten.sin", "aten._to_copy", "aten.to", "aten.clone", "aten.alias", "aten.contiguous",
          "aten.detach", "aten.neg", "aten.lift_fresh_copy"}


def _shape(n):
    v = n.meta.get("val")
    return tuple(v.shape) if hasattr(v, "shape") else None


def _slice(n, x, start, end):
    """Is ``n`` ``x[..., start:end]`` along the last axis?"""
    if op_names(n)[1] != "aten.slice" or n.args[0] is not x:
        return False
    rank = len(_shape(x))
    dim = n.args[1] if len(n.args) > 1 else 0
    s = n.args[2] if len(n.args) > 2 else 0
    e = n.args[3] if len(n.args) > 3 else _BIG
    step = n.args[4] if len(n.args) > 4 else 1
    last = _shape(x)[-1]
    return dim % rank == rank - 1 and step == 1 and (s or 0) == start and min(e if e is not None else _BIG, last) == end


def _rotate_half(r, x):
    """Is ``r`` ``cat(-x[..., h:], x[..., :h])`` along the last axis (``h`` half the last axis)?"""
    if op_names(r)[1] != "aten.cat" or len(r.args[0]) != 2:
        return None
    dim = r.args[1] if len(r.args) > 1 else 0
    if dim % len(_shape(r)) != len(_shape(r)) - 1:
        return None
    neg, lo = r.args[0]
    d = _shape(x)[-1]
    if d % 2 or op_names(neg)[1] != "aten.neg":
        return None
    hi = neg.args[0]
    if _slice(hi, x, d // 2, d) and _slice(lo, x, 0, d // 2):
        return [r, neg, hi, lo]
    return None


def _pair_constant(c, d) -> bool:
    """``c`` takes one value on units ``i`` and ``i + d/2`` of its last axis: it is ``cat(f, f)`` along the last axis
    seen through element-wise functions, scalings by tensors constant along that axis, and moves that keep it."""
    while True:
        shp = _shape(c)
        if shp is None or not shp or shp[-1] != d:
            return False
        name = op_names(c)[1]
        if name == "aten.cat":
            parts, dim = c.args[0], (c.args[1] if len(c.args) > 1 else 0)
            return dim % len(shp) == len(shp) - 1 and len(parts) == 2 and parts[0] is parts[1]
        if name in _UNARY or name in ("aten.unsqueeze", "aten.expand"):
            c = c.args[0]
        elif name in ("aten.slice", "aten.select"):
            src = c.args[0]
            if (c.args[1] if len(c.args) > 1 else 0) % len(_shape(src)) == len(_shape(src)) - 1:
                return False
            c = src
        elif name in ("aten.mul", "aten.div"):
            a, b = c.args[0], c.args[1]
            tensor_b = hasattr(b, "meta") and _shape(b) is not None and _shape(b) and _shape(b)[-1] != 1
            tensor_a = hasattr(a, "meta") and _shape(a) is not None and _shape(a) and _shape(a)[-1] != 1
            if tensor_a and tensor_b:
                return False
            c = a if tensor_a else b if name == "aten.mul" and tensor_b else None
            if c is None:
                return False
        else:
            return False


def _ancestors(n, stop) -> set:
    out, todo = set(), [n]
    while todo:
        x = todo.pop()
        if x in out or x in stop:
            continue
        out.add(x)
        todo.extend(x.all_input_nodes)
    return out


def _rope_sites(nodes):
    """Every ``x·cos + rotate_half(x)·sin`` in the graph: ``(x, add node, rope nodes, cos, sin)``."""
    for n in nodes:
        if n.op != "call_function" or op_names(n)[1] != "aten.add" or len(n.args) < 2:
            continue
        a, b = n.args[0], n.args[1]
        if not all(hasattr(t, "op") and op_names(t)[1] == "aten.mul" for t in (a, b)):
            continue
        for m1, m2 in ((a, b), (b, a)):
            for x, c in ((m1.args[0], m1.args[1]), (m1.args[1], m1.args[0])):
                if not hasattr(x, "op") or not hasattr(c, "op") or _shape(x) is None:
                    continue
                for r, s in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
                    if not hasattr(r, "op") or not hasattr(s, "op"):
                        continue
                    rot = _rotate_half(r, x)
                    if rot is not None:
                        yield x, n, [n, m1, m2, *rot], c, s


def rotary_maps(ctx, tms, kinds, Checker, copies, sites_of):
    """``(maps, pins)``: one rotary map per head-dim space that RoPE rotates, where proven."""
    from .._blocks import _Tree

    atoms = ctx.atoms
    tree = _Tree(atoms)
    nodes = list(ctx.layouts)
    found: dict[int, list] = {}
    for x, add, rope, c, s in _rope_sites(nodes):
        lay = _tensors(ctx, ctx.layouts.get(x))
        if len(lay) != 1:
            continue
        u = atoms.find(lay[0][-1])
        found.setdefault(u, []).append((x, add, rope, c, s))
    maps, pins = [], []
    outputs = [o for tm in tms for o in tm.graph.nodes if o.op == "output"]
    for u, sites in found.items():
        root = atoms.root(u)
        d = root.size
        if root.kind != "cat" or len(atoms.segments(u)) != 2 or len({atoms.find(p) for p in atoms.segments(u)}) != 1:
            pins.append(MapPin(f"rotary:{sites[0][0].name}", "rotary", "the two halves of the head dim are not one atom"))
            continue
        half = atoms.find(atoms.segments(u)[0])
        exempt, why = set(), None
        for x, add, rope, c, s in sites:
            if not (_pair_constant(c, d) and _pair_constant(s, d)):
                why = f"cos/sin at {add.name} are not proven equal on both units of each pair"
            stop = _ancestors(x, set())
            exempt.update(rope)
            exempt |= (_ancestors(c, stop) | _ancestors(s, stop))
        for comp, adds in _components(ctx, tree, nodes + outputs, half, exempt, sites):
            m, pin = _one(ctx, tms, tree, Checker, sites_of, comp, u, half, exempt, why, d, nodes)
            maps += [m] if m is not None else []
            pins += [pin] if pin is not None else []
    return maps, pins


def _components(ctx, tree, nodes, half, exempt, sites):
    """The parts of the graph that carry the head dim and meet only through RoPE (its nodes and cos/sin):
    each may rotate on its own (one per attention layer)."""
    adds = {add: x for x, add, *_ in sites}
    touch = [n for n in nodes if (n not in exempt or n in adds) and _touches(ctx, tree, n, half)]
    parent = {n: n for n in touch}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in touch:
        for x in n.all_input_nodes:
            if x in parent:
                parent[find(n)] = find(x)
    for add, x in adds.items():
        if add in parent and x in parent:
            parent[find(add)] = find(x)
    comps: dict = {}
    for n in touch:
        comps.setdefault(find(n), []).append(n)
    for comp in comps.values():
        here = [a for a in adds if a in comp]
        if here:
            yield comp, here


def _one(ctx, tms, tree, Checker, sites_of, comp, u, half, exempt, why, d, nodes):
    atoms = ctx.atoms
    chk = Checker(ctx, tms, tree, half, None)
    chk.exempt |= exempt
    chk.whole = u
    phs = [n for n in comp if n.op == "placeholder" and n not in exempt]
    keys = []
    for tm in tms:
        keys += [(tm.placeholder_key[n.name], n) for n in phs if n.graph is tm.graph and n.name in tm.placeholder_key]
    name = f"{keys[0][0]}:{chk.vars(keys[0][1])[0][2]}.rotary" if keys else f"rotary:{comp[0].name}"
    if why is None:
        chk.run(comp)
        if "orthogonal" not in chk.kinds or chk.centred:
            why = chk.reasons.get("orthogonal") or "the head dim must keep the all-ones vector"
    if why is not None:
        return None, MapPin(name, "rotary", why)
    h = _block(ctx, tree, chk, keys, u, half, exempt, comp)
    try:
        ss = sites_of(chk, keys, u, h)
    except ValueError as e:
        return None, MapPin(name, "rotary", str(e))
    if not ss:
        return None, None
    pairs = tuple((i, i + d // 2) for i in range(d // 2))
    return Map(name, "rotary", d, atoms.size(h) if h is not None else 1, tuple(ss), tuple(chk.folds), False, pairs, None,
               "RoPE rotates each frequency pair; every other op commutes with rotations of the pair", ("rotary",)), None


def _touches(ctx, tree, n, a) -> bool:
    for x in [n, *n.all_input_nodes]:
        for t in _tensors(ctx, ctx.layouts.get(x)):
            if any(a in tree.leaves(z) for z in t):
                return True
    return False


def _block(ctx, tree, chk, keys, u, half, exempt, nodes):
    """The free head atom each rotation may be chosen per block of (every op equivariant), or None (shared)."""
    atoms = ctx.atoms
    cands = None
    for _, n in keys:
        for t in _tensors(ctx, ctx.layouts.get(n)):
            for a in t:
                if half not in tree.leaves(a):
                    continue
                sib = {atoms.find(p) for p in tree._flat(a) if tree.is_leaf(p) and atoms.pinned(p) is None}
                cands = sib if cands is None else cands & sib
    for h in sorted(cands or ()):
        if all(_node_ok(ctx, tree, n, h, half, ctx.structured) for n in nodes
               if n not in exempt and _touches(ctx, tree, n, half)):
            return h
    return None
