"""Which inner groups may permute independently in every block (the wreath product), decided on the graph.

A product axis ``prod[h, d]`` (heads × head dim, groups × channels) is permuted by the Kronecker
``π_h ⊗ σ``: one ``σ`` for every block. Often each block may take its own ``σ_i``: head ``i``'s
value dims only meet head ``i``'s columns of the output projection. Declaring ``d`` *per* ``h`` is
sound when every op of the graph is equivariant under the larger group. This module checks that,
op by op, from how each op pairs indices (``rules/letters.py``):

- every tensor that carries ``d`` must carry ``h`` at every one of its positions, either fused with
  ``d`` in one axis (an enclosing product with ``h`` as a part) or on exactly one other axis; that
  axis may be the sorted rows of a routing whose grouped matmul the MoE rule proved (row r belongs
  to the block of its expert e(r): ``rules.moe.routed_rows``);
- an op that only moves elements is then equivariant; an op that aggregates along axes must not
  aggregate ``h`` without ``d`` (a softmax or sum over heads would mix different heads' dims);
- a contraction must index ``h`` with one letter in all operands that carry ``d``, and must not
  sum over ``h`` unless ``d`` goes with it (``q·kᵀ`` sums over the head dim within a head;
  a matrix mixing heads would pair dims of different heads);
- any other op must see ``h`` and ``d`` fused in one axis wherever it sees ``d``, and must not have
  asked for that axis' structure (then it treats the axis as one index, which any permutation keeps).

Anything else keeps ``d`` shared by all blocks, as before.
"""
from __future__ import annotations

import torch

from ._atoms import Stacked
from .rules.letters import get_letters
from .rules._ids import source
from .rules.moe import _sorts, routed_rows

__all__ = ["per_block"]

_STRUCTURE_OK = {"move", "group_norm", "conv"}  # signatures whose ops may ask for an axis' product structure


class _Tree:
    """Leaves of an atom and how they nest, read off the final atom table."""

    def __init__(self, atoms, routed=()):
        self.atoms = atoms
        self._leaves: dict[int, tuple] = {}
        self.routed = {}  # rows atom -> the expert atom each row is routed to (free leaves only)
        for rows, expert in routed:
            r, e = atoms.find(rows), atoms.find(expert)
            if self.is_leaf(r) and atoms.pinned(r) is None and self.routed.get(r, e) == e:
                self.routed[r] = e
            else:
                self.routed[r] = None  # rows of two experts' sorts, or rows that may not move: no block

    def routes(self, a, h) -> bool:
        """``a`` is the sorted rows of a routing whose every row r belongs to block e(r) of ``h``."""
        return self.routed.get(self.atoms.find(a)) == h and self.atoms.root(a).kind is None

    def is_leaf(self, a) -> bool:
        r = self.atoms.root(a)
        return r.kind is None and r.size > 1

    def leaves(self, a) -> tuple:
        """Leaf roots under ``a`` (with repeats)."""
        key = self.atoms.find(a)
        if key not in self._leaves:
            r = self.atoms.root(a)
            if r.size <= 1:
                out = ()
            elif r.kind is None:
                out = (key,)
            else:
                out = tuple(x for c in r.children for x in self.leaves(c))
            self._leaves[key] = out
        return self._leaves[key]

    def _flat(self, a) -> list:
        r = self.atoms.root(a)
        if r.kind != "prod":
            return [a]
        return [x for c in r.children for x in self._flat(c)]

    def covered(self, a, h, d, have=False) -> bool:
        """Every occurrence of ``d`` under ``a`` lies in a product with ``h`` as a (flattened) part."""
        r = self.atoms.root(a)
        if r.size <= 1:
            return True
        if r.kind is None:
            return self.atoms.find(a) != d or have
        parts = self._flat(a) if r.kind == "prod" else r.children
        if r.kind == "prod":
            have = have or any(self.is_leaf(p) and self.atoms.find(p) == h for p in parts)
        return all(self.covered(p, h, d, have) for p in parts)

    def full(self, a, h) -> bool:
        """``h`` has a coordinate at every index of ``a`` (its own, or the block its row is routed to)."""
        if self.routes(a, h):
            return True
        r = self.atoms.root(a)
        if r.kind is None:
            return r.size > 1 and self.atoms.find(a) == h
        if r.kind == "prod":
            return any(self.full(c, h) for c in self._flat(a)) and self.leaves(a).count(h) == 1
        return all(self.full(c, h) for c in r.children)


def _tensors(ctx, v) -> list:
    """The layouts (atom tuples) a node value stands for: a stacked value's slices, a list's items."""
    if v is None:
        return []
    if isinstance(v, Stacked):
        return [v.parts[0]] if v.collapsed else list(v.parts)
    if isinstance(v, list):
        return [t for item in v for t in _tensors(ctx, item)]
    return [v]


def _first(ctx, x):
    ts = _tensors(ctx, ctx.layouts.get(x))
    return ts[0] if ts else None


def _place(tree, lay, h, d):
    """How a tensor carries ``d``: None (not at all), ("joint", axis), ("split", d_axis, h_axis), or "bad"."""
    d_axes = [i for i, a in enumerate(lay) if d in tree.leaves(a)]
    if not d_axes:
        return None
    if len(d_axes) > 1:
        return "bad"
    i = d_axes[0]
    h_axes = [j for j, a in enumerate(lay) if h in tree.leaves(a) or tree.routes(a, h)]
    if tree.covered(lay[i], h, d):
        return ("joint", i) if h_axes == [i] else "bad"
    # split: d may recur along its axis (gate and up halves concatenated), each copy moved by its element's block
    if h in tree.leaves(lay[i]) or len(h_axes) != 1 or not tree.full(lay[h_axes[0]], h):
        return "bad"
    return ("split", i, h_axes[0])


def _node_ok(ctx, tree, node, h, d, structured) -> bool:
    """Is ``node``'s op equivariant when ``d`` permutes independently in every block of ``h``?"""
    vals = [ctx.layouts.get(node)] + [ctx.layouts.get(a) for a in node.all_input_nodes]
    places = [_place(tree, t, h, d) for v in vals for t in _tensors(ctx, v)]
    if "bad" in places:
        return False
    if all(p is None for p in places) or node.op == "placeholder":
        return True
    if node in ctx.wrappers:
        return True  # runs a body graph (checked node by node) on its operands unchanged
    sig = get_letters(node) if node.op == "call_function" else None
    kind = sig[0] if sig else None
    if node in structured and kind not in _STRUCTURE_OK:
        return False
    if kind is None:
        return all(p is None or p[0] == "joint" for p in places)
    if kind == "move":
        return True
    if kind == "mix":
        for t in _tensors(ctx, ctx.layouts.get(sig[1])):
            p = _place(tree, t, h, d)
            if p is not None and p[0] == "split" and p[2] in sig[2] and p[1] not in sig[2]:
                return False  # aggregates across blocks at a fixed inner index
        return True
    if kind == "letters":
        return _letters_ok(ctx, tree, node, sig[1], sig[2], h, d)
    if kind == "pick":
        return _pick_ok(ctx, tree, node, sig[1], sig[2], h, d) or all(p is None or p[0] == "joint" for p in places)
    if kind == "conv":
        return _conv_ok(ctx, tree, sig[1], sig[2], sig[3], h, d)
    if kind == "group_norm":
        return _group_norm_ok(ctx, tree, sig[1], sig[2], h, d)
    return False


def _letters_ok(ctx, tree, node, ops, out_letters, h, d) -> bool:
    seen = set()
    for val, letters in list(ops) + [(node, out_letters)]:
        for t in _tensors(ctx, ctx.layouts.get(val)):
            p = _place(tree, t, h, d)
            if p is None:
                continue
            if len(letters) != len(t):
                return False
            seen.add((letters[p[1]], letters[p[1]] if p[0] == "joint" else letters[p[2]]))
    blocks = {hl for _, hl in seen}
    if len(blocks) > 1:
        return False  # d meets d of another block (a matrix mixing heads, a head axis used as a row index)
    if not seen:
        return True
    hl = blocks.pop()
    return hl in out_letters or all(dl == hl or dl not in out_letters for dl, _ in seen)


def _pick_ok(ctx, tree, node, x, idx, h, d) -> bool:
    """``out[r] = x[ids[r]]`` with ``ids`` the sorted expert ids of a routing sort whose rows are routed to ``h``:
    row r belongs to block ids[r] = e(r) and takes that block's row of x (a per-expert bias)."""
    src = source(idx)
    entry = _sorts(ctx).get(src[0]) if isinstance(src, tuple) and src[1] == 0 else None
    if entry is None or tree.atoms.find(entry[0]) != h or not tree.routes(entry[1], h):
        return False
    li, lx, lo = _first(ctx, idx), _first(ctx, x), _first(ctx, node)
    if li is None or lx is None or lo is None or _place(tree, li, h, d) is not None:
        return False
    px, po = _place(tree, lx, h, d), _place(tree, lo, h, d)
    return (px is not None and px[0] == "split" and px[2] == 0 and po == ("split", px[1], 0)
            and tree.routes(lo[0], h) and tree.atoms.find(lo[0]) == tree.atoms.find(entry[1]))


def _conv_ok(ctx, tree, x, w, groups, h, d) -> bool:
    """A grouped conv pairs input block g with weight rows of block g: fine if ``h`` indexes the groups."""
    lx, lw = _first(ctx, x), _first(ctx, w)
    if lx is None or lw is None:
        return False
    pw = _place(tree, lw, h, d)
    c = len(lx) - (len(lw) - 2) - 1
    if pw is None or pw[0] == "joint":
        return True
    if groups == 1 or pw[1:] != (1, 0):
        return False
    facs = [tree.atoms.find(f) for f in tree._flat(lx[c])]
    sizes, n, k = [tree.atoms.size(f) for f in facs], 1, 0
    while k < len(facs) and n < groups:
        n *= sizes[k]; k += 1
    return n == groups and h in facs[:k]


def _group_norm_ok(ctx, tree, x, groups, h, d) -> bool:
    """Statistics per group: the inner group may not move channels between groups (``d`` in the group index needs ``h`` there too)."""
    lx = _first(ctx, x)
    facs = [tree.atoms.find(f) for f in tree._flat(lx[1])] if lx is not None else []
    sizes, n, k = [tree.atoms.size(f) for f in facs], 1, 0
    while k < len(facs) and n < groups:
        n *= sizes[k]; k += 1
    if n != groups:
        return d not in {x for f in facs for x in tree.leaves(f)}
    lead = {x for f in facs[:k] for x in tree.leaves(f)}  # leaves of the group index (a factor may be a concatenation)
    return not (d in lead and h not in lead)


def per_block(ctx, keys_layouts: dict) -> dict[int, int]:
    """``{inner leaf: block leaf}`` for every inner group that may permute independently per block."""
    atoms = ctx.atoms
    tree = _Tree(atoms, routed_rows(ctx).values())
    free = lambda a: tree.is_leaf(a) and atoms.pinned(a) is None  # noqa: E731
    state = [lay for lay in keys_layouts.values() if lay is not None]
    cands: dict[tuple[int, int], None] = {}
    for lay in state:
        ls = [x for a in lay for x in tree.leaves(a) if free(x)]
        for i, x in enumerate(ls):
            for y in ls[i + 1:] + ls[:i]:
                if x != y:
                    cands.setdefault((x, y))  # (block, inner): the outer-first order is tried first
    cands = [(h, d) for h, d in cands if all(_place(tree, lay, h, d) != "bad" for lay in state)]
    if not cands:
        return {}
    inner = {d for _, d in cands}
    touching: dict[int, set] = {d: set() for d in inner}  # inner leaf -> the nodes that read or make it
    for n, v in ctx.layouts.items():
        for d in {x for t in _tensors(ctx, v) for a in t for x in tree.leaves(a)} & inner:
            touching[d].add(n)
            touching[d].update(n.users)
    out: dict[int, int] = {}
    for h, d in cands:
        if d in out or h in out or d in out.values():
            continue
        if all(_node_ok(ctx, tree, n, h, d, ctx.structured) for n in touching[d] if n in ctx.layouts or n.op == "output"):
            out[d] = h
    return out
