"""Infer a model's continuous symmetries from its traced graph, on the permutation engine's atoms.

Every free permutation group is a candidate *space*: its units (per block, where the engine proved its
permutations independent per block: the dims of each attention head) may take a linear map of their
own. A kind holds on a space only if **every** op that touches the space (every graph node whose result
or operands carry its atom) is proven to commute with it by a rule of ``autoperm.maps.rules``; an op
with no rule blocks every kind, and each blocked kind is recorded as a :class:`MapPin` naming the op.

Roles: every tensor axis carrying the space transforms as ``A·`` (primal) or ``A^{-T}·`` (dual). The
rules tie roles (a contraction summing the space pairs a primal with a dual operand); when the ties
contradict each other (tied embedding and head, a fused q/k projection read on both sides of ``q·kᵀ``)
only maps with ``A^{-T} = A`` hold: orthogonal ones.

Norm weights and biases that scale the space elementwise are folded (:class:`Fold`) into the linear
layers reading the normalised values; they must be read by nothing else (no tied reader, no residual
add: a post-norm stream is pinned).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import torch

from .._blocks import _Tree, _tensors
from ..rules.letters import get_letters
from ..spec import PermutationSpec
from .map import Fold, Map, MapPin, Site
from .rules import LINEAR, ORTHOGONAL, get_map_rule, op_names

__all__ = ["infer_maps", "maps_from_analysis", "DEFAULT_KINDS"]

DEFAULT_KINDS = ("orthogonal", "rotary", "scale")
_PREFERENCE = ("invertible", "orthogonal", "scale")  # the largest group first
_PASS = {"aten._to_copy", "aten.to", "aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "getitem",
         "aten.lift_fresh_copy", "aten.type_as", "aten._assert_tensor_metadata"}
_READ_THROUGH = _PASS | {"aten.select", "aten.slice", "aten.index", "aten.reshape", "aten.view", "aten._unsafe_view",
                         "aten.unsqueeze", "aten.squeeze", "aten.flatten", "aten.unflatten", "aten.dropout",
                         "aten.expand", "aten.permute", "aten.transpose", "aten.roll"}  # moves that keep each unit


def _users(n) -> list:
    """The users of ``n`` that read its value (export's dtype assertions read nothing)."""
    return [u for u in n.users if op_names(u)[1] != "aten._assert_tensor_metadata"]


def _weight_source(w, axis):
    """``(placeholder, axis)`` of a weight seen through transposes, permutes and casts read by nothing else."""
    while isinstance(w, torch.fx.Node) and w.op == "call_function":
        name = op_names(w)[1]
        if len(_users(w)) != 1:
            return None
        if name in ("aten.transpose", "aten.swapaxes", "aten.swapdims"):
            n = len(w.meta["val"].shape)
            a, b = w.args[1] % n, w.args[2] % n
            axis = b if axis == a else a if axis == b else axis
        elif name == "aten.t":
            axis = 1 - axis
        elif name == "aten.permute":
            axis = list(w.args[1])[axis] % len(w.meta["val"].shape)
        elif name not in _PASS:
            return None
        w = w.args[0]
    if isinstance(w, torch.fx.Node) and w.op == "placeholder":
        return w, axis
    return None


class _Parity:
    """Union-find with a parity bit: ``same`` / ``opposite`` ties; a contradiction is remembered."""

    def __init__(self):
        self.parent, self.bit = {}, {}
        self.conflict: str | None = None

    def find(self, u):
        if u not in self.parent:
            self.parent[u], self.bit[u] = u, 0
        p = self.parent[u]
        if p == u:
            return u, 0
        r, b = self.find(p)
        self.parent[u], self.bit[u] = r, self.bit[u] ^ b
        return r, self.bit[u]

    def tie(self, u, v, flip: int, where: str):
        (ru, bu), (rv, bv) = self.find(u), self.find(v)
        if ru == rv:
            if (bu ^ bv) != flip and self.conflict is None:
                self.conflict = where
            return
        self.parent[ru], self.bit[ru] = rv, bu ^ bv ^ flip


class Checker:
    """One space (atom ``d``, per block of ``h`` or shared): runs every touching node's rule."""

    def __init__(self, ctx, tms, tree, d, h):
        self.ctx, self.tms, self.tree, self.d, self.h = ctx, tms, tree, d, h
        self.kinds = set(LINEAR)
        self.reasons: dict[str, str] = {}
        self.centred = False
        self.roles = _Parity()
        self.roles_unknown: str | None = None
        self.folds: list[Fold] = []
        self.fold_keys: set[str] = set()
        self.exempt: set = set()
        self.squares: set = set()
        self.writers: list = []
        self._axes: dict = {}

    # -- queries for rules --------------------------------------------------------------------------
    def parts(self, x) -> list:
        return _tensors(self.ctx, self.ctx.layouts.get(x)) if isinstance(x, torch.fx.Node) else []

    def axes(self, x) -> list[int]:
        """Axes of ``x`` that carry the space (in any slice of a stacked value)."""
        if not isinstance(x, torch.fx.Node):
            return []
        if x not in self._axes:
            self._axes[x] = sorted({i for t in self.parts(x) for i, a in enumerate(t) if self.d in self.tree.leaves(a)})
        return self._axes[x]

    def vars(self, x) -> list:
        return [(x, j, i) for j, t in enumerate(self.parts(x)) for i, a in enumerate(t) if self.d in self.tree.leaves(a)]

    @staticmethod
    def op(node) -> str:
        return op_names(node)[0]

    @staticmethod
    def where(node) -> str:
        return f"{node.name} ({op_names(node)[0]})"

    # -- verdicts -------------------------------------------------------------------------------------
    def keep(self, kinds, reason: str):
        for k in self.kinds - set(kinds):
            self.reasons.setdefault(k, reason)
        self.kinds &= set(kinds)

    def center(self, reason: str):
        self.centred = True
        self.keep(ORTHOGONAL, reason + " (only orthogonal maps that fix the all-ones vector)")

    def _tie(self, u, v, flip, node):
        self.roles.tie(u, v, flip, self.where(node) if isinstance(node, torch.fx.Node) else str(node))

    def all_same(self, node):
        """Result and every operand carrying the space transform alike (one axis each)."""
        vs = [v for x in [node, *node.all_input_nodes] for v in self.vars(x)]
        if any(len(self.axes(x)) > 1 for x in [node, *node.all_input_nodes]):
            self.roles_unknown = self.roles_unknown or f"{self.where(node)} moves a tensor with the space on two axes"
            return
        for v in vs[1:]:
            self._tie(vs[0], v, 0, node)

    # -- patterns -------------------------------------------------------------------------------------
    def squared(self, node) -> bool:
        """``x²`` (pow 2, square, x*x) read only by sums/means over the space: an orthogonal-invariant statistic."""
        if node.target == torch.ops.aten.pow.Tensor_Scalar and node.args[1] != 2:
            return False
        ax = set(self.axes(node))
        for u in node.users:
            if op_names(u)[1] not in ("aten.mean", "aten.sum"):
                return False
            dims = u.args[1] if len(u.args) > 1 else None
            if dims is None:
                continue
            dims = {x % len(self.ctx.shape(node)) for x in ([dims] if isinstance(dims, int) else dims)}
            if not ax <= dims:
                return False
        self.squares.add(node)
        self.keep(ORTHOGONAL, f"sum of squares over the space at {self.where(node)} (RMS) is kept by orthogonal maps only")
        return True

    def is_square(self, x) -> bool:
        return x in self.squares

    def _param_chain(self, x):
        """``(key, plus_one, chain)`` when ``x`` is a parameter (1-D, the space) seen through casts and ``+ 1``."""
        chain, plus_one = [], False
        while isinstance(x, torch.fx.Node) and x.op == "call_function":
            name = op_names(x)[1]
            if len(_users(x)) != 1:
                return None
            if name in _PASS:
                chain.append(x)
                x = x.args[0]
            elif name == "aten.add" and not plus_one and len(x.args) >= 2 and not isinstance(x.args[1], torch.fx.Node) \
                    and x.args[1] == 1 and x.kwargs.get("alpha", 1) == 1:
                chain.append(x)
                plus_one, x = True, x.args[0]
            else:
                return None
        if not isinstance(x, torch.fx.Node) or x.op != "placeholder" or len(_users(x)) != 1:
            return None
        key, kind = self._key(x)
        if key is None or kind != "param" or self.ctx.shape(x) is None or len(self.ctx.shape(x)) != 1 \
                or self.axes(x) != [0] or self._aliases(key):
            return None
        return key, plus_one, chain + [x]

    def _key(self, ph):
        for tm in self.tms:
            if ph.graph is tm.graph:
                return tm.placeholder_key.get(ph.name), tm.placeholder_kind.get(ph.name, "input")
        return None, None

    def _aliases(self, key) -> list[str]:
        return sorted({o for tm in self.tms for o in tm.aliases.get(key, ())})

    def readers(self, node, shift: bool):
        """``(readers, None)``: the linear layers that read ``node``'s values along the space (through moves that
        keep each unit), as ``(weight key, axis, bias key)``; or ``(None, reason)``."""
        out, todo, seen = [], _users(node), set()
        lay = self.parts(node)[0] if self.parts(node) else ()
        axes = self.axes(node)
        if len(axes) != 1 or len(self.parts(node)) != 1:
            return None, f"{self.where(node)} carries the space on {len(axes)} axes"
        unit = self.ctx.atoms.find(lay[axes[0]])
        while todo:
            u = todo.pop()
            if u in seen:
                continue
            seen.add(u)
            name = op_names(u)[1]
            if name in _READ_THROUGH or (name == "aten.mean" and self._mean_elsewhere(u)) or (
                    name in ("aten.pad", "aten.constant_pad_nd") and not any(u.args[1])):
                if len(self.axes(u)) != 1:
                    return None, f"{self.where(u)} reshapes the space"
                todo.extend(_users(u))
                continue
            got = self._reader(u, unit)
            if isinstance(got, str):
                return None, got
            key, axis, bkey = got
            if shift and bkey is None:
                return None, f"the norm's shift cannot fold into {key!r}: that layer has no bias parameter of its own"
            out.append(got)
        if not out:
            return None, f"{self.where(node)} is read by no linear layer"
        return tuple(out), None

    def _mean_elsewhere(self, u) -> bool:
        dims = u.args[1] if len(u.args) > 1 else None
        if dims is None:
            return False
        n = len(self.ctx.shape(u.args[0]))
        return not {x % n for x in ([dims] if isinstance(dims, int) else dims)} & set(self.axes(u.args[0]))

    def _reader(self, u, unit):
        name = op_names(u)[1]
        w = b = None
        if name == "aten.linear":
            w, b, axis = u.args[1], (u.args[2] if len(u.args) > 2 else u.kwargs.get("bias")), 1
        elif name == "aten.addmm":
            b, w, axis = u.args[0], u.args[2], 0
        elif name in ("aten.mm", "aten.matmul"):
            w, axis = u.args[1], 0
        elif name in ("aten._grouped_mm", "transformers.grouped_mm_fallback", "autoperm.grouped_mm") and \
                len(self.ctx.shape(u.args[0])) == 2:
            w, b, axis = u.args[1], (u.args[3] if len(u.args) > 3 else u.kwargs.get("bias")), 1
        else:
            return f"{self.where(u)} reads the normalised values (not a linear layer: the scale sits on the space)"
        got = _weight_source(w, axis)
        if got is None or len(_users(got[0])) != 1:
            return f"{self.where(u)} does not read a weight of its own (tied, or read by another op too)"
        w, axis = got
        key, kind = self._key(w)
        if key is None or kind != "param" or self.axes(w) != [axis] or \
                self.ctx.atoms.find(self.parts(w)[0][axis]) != unit:
            return f"{self.where(u)} does not read the normalised axis, index for index, with a parameter"
        if self._aliases(key):
            return f"{key!r} is tied to {self._aliases(key)[0]!r}: folding a norm into it would change both"
        bkey = None
        if isinstance(b, torch.fx.Node) and b.op == "placeholder" and len(_users(b)) == 1:
            bkey, bkind = self._key(b)
            bkey = bkey if bkind == "param" and not self._aliases(bkey) else None
        return key, axis, bkey

    def fold_scale(self, node) -> bool:
        """``node = w * x`` with ``w`` a parameter along the space: folded into the readers, or blocked with why."""
        for p, x in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            got = self._param_chain(p)
            if got is None:
                continue
            key, plus_one, chain = got
            readers, why = self.readers(node, shift=False)
            if readers is None:
                self.keep(frozenset(), f"the elementwise scale {key!r} at {self.where(node)} cannot fold: {why}")
                return True
            self.folds.append(Fold(key, None, readers, plus_one))
            self.fold_keys.add(key)
            for v in self.vars(node):
                for u in self.vars(x):
                    self._tie(u, v, 0, node)
            return True
        return False

    def prepass(self, nodes):
        """Mark the casts and ``+ 1`` that carry fold weights to their product (not ops on the space)."""
        for n in nodes:
            if n.op != "call_function":
                continue
            name = op_names(n)[1]
            if name == "aten.mul":
                cands = n.args[:2]
            elif name in ("aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm"):
                cands = n.args[2:4]
            else:
                continue
            for p in cands:
                got = self._param_chain(p) if isinstance(p, torch.fx.Node) else None
                if got is not None:
                    self.exempt.update(got[2])

    def normalisation(self, node, x, k, weight, bias, centred: bool):
        rank = len(self.ctx.shape(x))
        if not set(self.axes(x)) <= set(range(rank - k, rank)):
            self.keep(frozenset(), f"{self.where(node)} normalises over other axes than the space")
            return
        what = "mean removal and RMS" if centred else "RMS"
        if centred:
            self.center(f"{what} over the space at {self.where(node)}")
        else:
            self.keep(ORTHOGONAL, f"{what} over the space at {self.where(node)} is kept by orthogonal maps only")
        out = node
        if op_names(node)[1] == "aten.native_layer_norm":
            outs = [u for u in node.users if u.args[1] == 0]
            out = outs[0] if len(outs) == 1 else None
        keys = []
        for p in (weight, bias):
            if p is None:
                keys.append(None)
                continue
            got = self._param_chain(p)
            if got is None or got[1] or k != 1:
                self.keep(frozenset(), f"the weight of {self.where(node)} is not a parameter of its own along the space")
                return
            keys.append(got[0])
        if any(keys) and out is not None:
            readers, why = self.readers(out, shift=keys[1] is not None)
            if readers is None:
                self.keep(frozenset(), f"the scale of {self.where(node)} cannot fold: {why}")
                return
            self.folds.append(Fold(keys[0], keys[1], readers))
            self.fold_keys.update(k_ for k_ in keys if k_)
        vs = self.vars(x) + [v for y in ([node] if out is node else [node, out]) for v in self.vars(y)]
        for v in vs[1:]:
            self._tie(vs[0], v, 0, node)

    def contraction(self, node):
        sig = get_letters(node)
        if sig is None or sig[0] != "letters":
            self.keep(frozenset(), f"no index signature for {self.where(node)}")
            return
        _, ops, out_letters = sig
        name = op_names(node)[1]
        def arg(i, kw):
            a = node.args[i] if len(node.args) > i else node.kwargs.get(kw)
            return a if isinstance(a, torch.fx.Node) else None

        additive = {"aten.linear": (2, "bias"), "aten.addmm": (0, "self"), "aten.baddbmm": (0, "self"),
                    "aten._grouped_mm": (3, "bias")}.get(name)
        add_node = arg(*additive) if additive is not None else None
        mask = arg(3, "attn_mask") if "scaled_dot_product" in name else None
        if mask is not None and self.axes(mask):
            self.keep(frozenset(), f"an attention mask along the space at {self.where(node)}")
            return
        mult: dict[str, list] = {}
        adds: list = []
        out_vars: dict[str, list] = {}
        for val, letters in ops:
            if val is mask:
                continue
            is_add = val is add_node
            for j, t in enumerate(self.parts(val)):
                if len(t) != len(letters):
                    self.keep(frozenset(), f"unreadable operand of {self.where(node)}")
                    return
                for i, a in enumerate(t):
                    if self.d in self.tree.leaves(a):
                        (adds if is_add else mult.setdefault(letters[i], [])).append(((val, j, i), letters[i]))
        for j, t in enumerate(self.parts(node)):
            for i, a in enumerate(t):
                if self.d in self.tree.leaves(a):
                    out_vars.setdefault(out_letters[i], []).append((node, j, i))
        if add_node is not None and out_vars and not self.axes(add_node):
            self.center(f"adds a term constant along the space at {self.where(node)}")
        for letter, occ in mult.items():
            if letter in out_letters:
                if len(occ) != 1:
                    self.keep(frozenset(), f"elementwise product of tensors in the space at {self.where(node)}")
                    return
                for v in out_vars.get(letter, []):
                    self._tie(occ[0][0], v, 0, node)
                    self.writers.append(occ[0][0])
            elif len(occ) == 2:
                self._tie(occ[0][0], occ[1][0], 1, node)
            elif len(occ) == 1:
                self.center(f"sums the space against a constant at {self.where(node)}")
            else:
                self.keep(frozenset(), f"contracts the space over {len(occ)} operands at {self.where(node)}")
        for (v, letter) in adds:
            for o in out_vars.get(letter, []):
                self._tie(v, o, 0, node)
        if set(out_vars) - set(mult) - {lt for _, lt in adds}:
            self.keep(frozenset(), f"the space appears in the result of {self.where(node)} from no operand")

    def convolution(self, node):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        sx, sw = self.ctx.shape(x), self.ctx.shape(w)
        c = len(sx) - len(sw) + 1  # channel axis of the input (batched or not)
        ax_x, ax_w, ax_o = self.axes(x), self.axes(w), self.axes(node)
        if any(a != c for a in ax_x) or any(a > 1 for a in ax_w) or any(a != c for a in ax_o):
            self.keep(frozenset(), f"{self.where(node)} convolves along the space")
            return
        if groups != 1 and (ax_x or ax_w):
            self.keep(frozenset(), f"{self.where(node)} is a grouped (depthwise) convolution over the space")
            return
        vw = {i: v for v in self.vars(w) for i in [v[2]]}
        for v in self.vars(x):
            self._tie(v, vw[1], 1, node) if 1 in vw else self.keep(frozenset(), f"{self.where(node)}: unpaired input")
        for v in self.vars(node):
            if 0 not in vw:
                self.keep(frozenset(), f"{self.where(node)}: unpaired output")
                continue
            self._tie(vw[0], v, 0, node)
            self.writers.append(vw[0])
        for v in self.vars(b) if isinstance(b, torch.fx.Node) else []:
            for o in self.vars(node):
                self._tie(v, o, 0, node)

    # -- the run --------------------------------------------------------------------------------------
    def run(self, nodes):
        self.prepass(nodes)
        first: dict = {}  # one tensor read by several placeholders (two graphs, tied keys): one role per axis
        for n in nodes:
            if n in self.exempt:
                continue
            if n.op == "placeholder":
                key, kind = self._key(n)
                if key is not None:
                    cls = min((key, *self._aliases(key)))
                    for v in self.vars(n):
                        self._tie(first.setdefault((cls, v[1], v[2]), v), v, 0, n)
                if kind is None:
                    self.roles_unknown = self.roles_unknown or f"{n.name} (a wrapped graph's input)"
                elif key is None or kind not in ("param", "buffer"):
                    self.keep(frozenset(), f"{kind} {n.name} carries the space")
                continue
            if n.op == "output":
                self.keep(frozenset(), "the space reaches a model output")
                continue
            if n.op != "call_function":
                self.keep(frozenset(), f"{n.op} node {n.name} touches the space")
                continue
            if n in self.ctx.wrappers:
                self.roles_unknown = self.roles_unknown or f"{n.name} runs a wrapped graph"
                continue
            rule = get_map_rule(n)
            if rule is None:
                self.keep(frozenset(), f"no map rule for {self.where(n)}")
                continue
            try:
                rule(self, n)
            except Exception as e:  # noqa: BLE001 - a failing rule blocks, never passes
                self.keep(frozenset(), f"map rule for {self.where(n)} failed ({type(e).__name__}: {e})")
        if self.roles.conflict or self.roles_unknown:
            why = (f"the space is read as its own dual at {self.roles.conflict} (tied or fused weights): only maps "
                   f"with A^-T = A hold") if self.roles.conflict else f"roles not proven: {self.roles_unknown}"
            self.keep(ORTHOGONAL, why)


def _copies(atoms, tree, a, d, h, off=0, stride=1, block=None, out=None):
    """Positions of every copy of ``d`` in atom ``a``: ``(offset, unit stride, block coordinate)``."""
    out = [] if out is None else out
    r = atoms.root(a)
    if r.size <= 1:
        return out
    if r.kind is None:
        if atoms.find(a) == d:
            out.append((off, stride, block))
        return out
    if r.kind == "cat":
        pos = 0
        for c in r.children:
            _copies(atoms, tree, c, d, h, off + pos * stride, stride, block, out)
            pos += atoms.size(c)
        return out
    parts = tree._flat(a)
    sizes = [atoms.size(p) for p in parts]
    inner = [math.prod(sizes[k + 1:]) for k in range(len(parts))]
    with_d = [k for k, p in enumerate(parts) if d in tree.leaves(p)]
    if len(with_d) > 1:
        raise ValueError("the space appears twice in one product axis")
    if not with_d:
        return out
    k = with_d[0]
    others = [m for m in range(len(parts)) if m != k]
    if math.prod(sizes[m] for m in others) > 1 << 16:
        raise ValueError("too many copies of the space in one axis")
    hpos = [m for m in others if h is not None and atoms.find(parts[m]) == h and atoms.root(parts[m]).kind is None]
    for combo in itertools.product(*(range(sizes[m]) for m in others)):
        o = off + stride * sum(j * inner[m] for j, m in zip(combo, others))
        b = block
        if hpos:
            b = combo[others.index(hpos[0])]
        _copies(atoms, tree, parts[k], d, h, o, stride * inner[k], b, out)
    return out


def _sites(key, axis, role, copies, blocks):
    """Sites for a tensor axis' copies: one per copy (shared map) or one per copy index within a block."""
    if blocks == 1:
        return [Site(key, axis, role, off, 0, st) for off, st, _ in copies]
    by_block: dict[int, list] = {}
    for off, st, b in copies:
        if b is None:
            raise ValueError(f"{key!r} axis {axis} carries units of the space outside any block")
        by_block.setdefault(b, []).append((off, st))
    if sorted(by_block) != list(range(blocks)) or len({len(v) for v in by_block.values()}) != 1:
        raise ValueError(f"{key!r} axis {axis} does not hold every block alike")
    out = []
    for c in range(len(by_block[0])):
        o0, st = by_block[0][c]
        bs = by_block[1][c][0] - o0 if blocks > 1 else 0
        if any(by_block[b][c] != (o0 + b * bs, st) for b in range(blocks)):
            raise ValueError(f"{key!r} axis {axis}: blocks are not evenly spaced")
        out.append(Site(key, axis, role, o0, bs, st))
    return out


def maps_from_analysis(ctx, tms, spec: PermutationSpec, kinds: Sequence[str] | None = None) -> PermutationSpec:
    """``spec`` with ``maps`` and ``map_pins`` inferred from the analysis that made it (``autoperm._infer.analyse``)."""
    kinds = tuple(DEFAULT_KINDS if kinds is None else kinds)
    bad = set(kinds) - {"orthogonal", "invertible", "rotary", "scale"}
    if bad:
        raise ValueError(f"unknown map kinds {sorted(bad)}")
    atoms = ctx.atoms
    tree = _Tree(atoms)
    blocks_of = set(ctx.per_roots.values())
    touching: dict[int, list] = {}
    roots = {r: name for name, r in ctx.group_roots.items()}
    order = {n: i for i, n in enumerate(ctx.layouts)}
    outputs = [n for tm in tms for n in tm.graph.nodes if n.op == "output"]
    for n in list(ctx.layouts) + outputs:
        seen = set()
        for x in [n, *n.all_input_nodes]:
            for t in _tensors(ctx, ctx.layouts.get(x)):
                for a in t:
                    seen.update(tree.leaves(a))
        for d in seen & set(roots):
            touching.setdefault(d, []).append(n)
    maps, pins = [], []
    for d, name in roots.items():
        if d in blocks_of or d not in touching:
            continue
        h = ctx.per_roots.get(d)
        nodes = sorted(set(touching[d]), key=lambda n: order.get(n, len(order)))
        chk = Checker(ctx, tms, tree, d, h)
        chk.run(nodes)
        want = [k for k in _PREFERENCE if k in kinds and k in chk.kinds]
        if chk.centred:
            want = [k for k in want if k == "orthogonal"]
        for k in (k for k in _PREFERENCE if k in kinds and k not in chk.kinds):
            pins.append(MapPin(name, k, chk.reasons.get(k, "blocked")))
        if not want:
            continue
        try:
            m = _build_map(ctx, tms, chk, name, want[0], d, h)
        except ValueError as e:
            pins.append(MapPin(name, want[0], str(e)))
            continue
        if m is not None:
            maps.append(m)
    return dataclasses.replace(spec, maps=maps, map_pins=pins)


def _build_map(ctx, tms, chk, name, kind, d, h):
    atoms, tree = ctx.atoms, chk.tree
    blocks = atoms.size(h) if h is not None else 1
    ref = chk.writers[0] if chk.writers else None
    sites = []
    for tm in tms:
        for n in tm.graph.nodes:
            if n.op != "placeholder" or n not in ctx.layouts:
                continue
            key, kind_ = tm.placeholder_key.get(n.name), tm.placeholder_kind.get(n.name)
            if key is None or kind_ not in ("param", "buffer") or key in chk.fold_keys:
                continue
            for (_, j, axis) in chk.vars(n):
                var = (n, j, axis)
                if ref is None:
                    ref = var
                (rv, bv), (rr, br) = chk.roles.find(var), chk.roles.find(ref)
                if rv != rr and kind != "orthogonal":
                    raise ValueError(f"the role of {key!r} axis {axis} is tied to no other tensor of the space")
                role = "primal" if (rv != rr or bv == br) else "dual"
                lay = chk.parts(n)[j]
                copies = _copies(atoms, tree, lay[axis], d, h)
                for k in (key, *sorted(tm.aliases.get(key, ()))):
                    sites.extend(s for s in _sites(k, axis, role, copies, blocks) if s not in sites)
    if not sites:
        return None
    holds = tuple(k for k in _PREFERENCE if k in chk.kinds and (not chk.centred or k == "orthogonal"))
    reason = "every op on these units commutes with it"
    return Map(name, kind, atoms.size(d), blocks, tuple(sites), tuple(chk.folds), chk.centred and kind == "orthogonal",
               group=name, reason=reason, holds=holds)


def infer_maps(model: torch.nn.Module, example_inputs, spec: PermutationSpec | None = None, *,
               kinds: Sequence[str] | None = None, modes: Sequence[str] | None = None) -> PermutationSpec:
    """The permutation spec of ``model`` with its continuous symmetries (``maps``) and the kinds blocked
    where (``map_pins``), inferred from the traced graph.

    ``kinds`` lists the kinds to infer (default ``("orthogonal", "rotary", "scale")``); each space takes
    the largest of them that holds (invertible, else orthogonal, else scale); ``Map.holds`` lists every
    kind that holds on it. ``spec`` is ignored but for its type; the model is not modified.

    >>> import torch
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = infer_maps(mlp, torch.randn(3, 4))
    >>> [(m.kind, m.size, [s.role for s in m.sites]) for m in spec.maps]
    [('scale', 8, ['primal', 'primal', 'dual'])]
    >>> spec.map_pins[0].kind, spec.map_pins[0].reason
    ('orthogonal', 'relu (aten.relu.default) commutes with positive scalings only')
    """
    from .._infer import analyse

    ctx, tms, base = analyse(model, example_inputs, modes=modes)
    return maps_from_analysis(ctx, tms, base, kinds)
