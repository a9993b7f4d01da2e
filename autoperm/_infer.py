"""The inference engine: walk the exported graph, apply each op's rule, collect permutation groups.

Every tensor axis carries an atom (see ``_atoms``). Parameters and buffers
start with free atoms; model inputs, outputs, constants and non-persistent
buffers are pinned. Ops with no rule pin every axis they touch. The atoms
left free at the end, as they appear in state-dict tensors, are the groups.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Sequence

import networkx as nx
import torch
from torch.fx import Node

from ._atoms import AtomTable, Layout, Stacked
from ._blocks import per_block
from ._trace import TraceError, TracedModel, mode_of, trace
from .rules import get_rule
from .spec import PermutationSpec, Pin

__all__ = ["infer_spec", "analyse", "Context", "axis_graph"]

UNUSED = "not used by the traced graph"


class Context:
    """What a rule sees: layouts and shapes of a node's inputs, and the atom operations."""

    def __init__(self, atoms: AtomTable):
        self.atoms = atoms
        self.layouts: dict[Node, Any] = {}
        self.node: Node | None = None
        self.unsupported: list[str] = []
        self.state_layouts: dict[str, Any] = {}  # state-dict key -> layout, one per tensor across graphs
        self.structured: set[Node] = set()  # nodes whose rule asked for an axis' product structure
        self.wrappers: set[Node] = set()  # higher-order nodes whose body graph was analysed node by node
        self.group_roots: dict[str, int] = {}  # group name -> its root atom (set when the spec is built)
        self.per_roots: dict[int, int] = {}  # inner root -> block root, for groups independent per block

    # -- lookups ----------------------------------------------------------
    def lay(self, x) -> Layout | None:
        """Layout of a graph value (a tuple of atoms), or None for non-tensors."""
        v = self.layouts.get(x) if isinstance(x, Node) else None
        if isinstance(v, Stacked):
            if not v.collapsed:
                for part in v.parts[1:]:
                    self.unify(v.parts[0], part)
                v.collapsed = True
            return v.parts[0]
        return v

    def stacked(self, x) -> Stacked | None:
        """The stacked form of a value, if it has one and no rule has tied its slices yet."""
        v = self.layouts.get(x) if isinstance(x, Node) else None
        return v if isinstance(v, Stacked) and not v.collapsed else None

    @staticmethod
    def shape(x) -> tuple[int, ...] | None:
        v = x.meta.get("val") if isinstance(x, Node) else None
        return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None

    def out_shape(self):
        v = self.node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return tuple(int(s) for s in v.shape)
        if isinstance(v, (list, tuple)):
            return [tuple(int(s) for s in t.shape) if isinstance(t, torch.Tensor) else None for t in v]
        return None

    @property
    def where(self) -> str:
        return f"{self.node.name} ({_target_name(self.node.target)})" if self.node is not None else "graph"

    # -- atom operations --------------------------------------------------
    def fresh(self, size: int, pinned: str | None = None) -> int:
        return self.atoms.fresh(size, pinned)

    def fresh_layout(self, shape, pinned: str | None = None) -> Layout:
        return tuple(self.atoms.fresh(s, pinned) for s in shape)

    def pinned_layout(self, shape, why: str) -> Layout:
        return self.fresh_layout(shape, f"{why} at {self.where}")

    def union(self, a: int, b: int) -> int:
        self.atoms.union(a, b, self.where)
        return a

    def unify(self, la: Layout, lb: Layout) -> Layout:
        for a, b in zip(la, lb, strict=True):
            self.union(a, b)
        return la

    def pin(self, a: int, why: str) -> None:
        self.atoms.pin(a, f"{why} at {self.where}")

    def pin_layout(self, layout, why: str) -> None:
        for a in _flat(layout):
            self.pin(a, why)

    def size(self, a: int) -> int:
        return self.atoms.size(a)

    def prod(self, atoms: Sequence[int]) -> int:
        self.structured.add(self.node)
        return self.atoms.composite("prod", list(atoms))

    def cat(self, atoms: Sequence[int]) -> int:
        return self.atoms.composite("cat", list(atoms))

    def split_prod(self, a: int, sizes: Sequence[int], why: str) -> list[int]:
        """Factor ``a`` into row-major factors of ``sizes``; pins ``a`` when it cannot be factored."""
        self.structured.add(self.node)
        out = self.atoms.as_prod(a, list(sizes), self.where)
        if out is None:
            self.pin(a, f"{why}: cannot factor {self.size(a)} as {list(sizes)}")
            out = [self.fresh(s, self.atoms.pinned(a)) for s in sizes]  # the pieces keep the atom's reason
        return out

    def split_cat(self, a: int, sizes: Sequence[int], why: str) -> list[int]:
        """Cut ``a`` into consecutive pieces of ``sizes``; pins ``a`` when it cannot be cut there."""
        out = self.atoms.as_cat(a, list(sizes))
        if out is None:
            self.pin(a, f"{why}: cannot cut {self.size(a)} into {list(sizes)}")
            out = [self.fresh(s, self.atoms.pinned(a)) for s in sizes]  # the pieces keep the atom's reason
        return out

    def broadcast(self, *xs) -> Layout:
        """Unify tensor arguments under broadcasting (aligned from the right); return the output layout."""
        shaped = [(self.lay(x), self.shape(x)) for x in xs if self.lay(x) is not None]
        out_shape = self.out_shape()
        out = [None] * len(out_shape)
        for lay, shp in shaped:
            off = len(out_shape) - len(shp)
            for i, (a, s) in enumerate(zip(lay, shp)):
                if s == 1 and out_shape[off + i] != 1:
                    continue  # broadcast axis: constant along it
                if out[off + i] is None:
                    out[off + i] = a
                else:
                    self.union(out[off + i], a)
        return tuple(a if a is not None else self.fresh(s) for a, s in zip(out, out_shape))


def _flat(layout):
    if layout is None:
        return []
    if isinstance(layout, list):
        return [a for item in layout for a in _flat(item)]
    return list(layout)


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"aten.{t._opname}.{t._overloadname}" if t.namespace == "aten" else str(t)
    return getattr(t, "__name__", str(t))


def _default_rule(ctx: Context, node: Node, why: str):
    """No rule: pin every axis of every tensor the op touches; outputs come out pinned."""
    ctx.unsupported.append(f"{node.name}: {why}")
    for a in node.all_input_nodes:
        ctx.pin_layout(ctx.lay(a), why)
    shp = ctx.out_shape()
    if isinstance(shp, list):
        return [ctx.pinned_layout(s, why) if s is not None else None for s in shp]
    return ctx.pinned_layout(shp, why) if shp is not None else None


def _run(*tms: TracedModel) -> Context:
    """Analyse one or more graphs of the same model (traced in different modes) on one atom table.

    A state-dict tensor has one layout across all graphs, so a coupling or pin found in any mode
    holds in every mode; a tensor no graph reads is pinned as unused.
    """
    ctx = Context(AtomTable())
    used = set().union(*(_used_keys(tm) for tm in tms))
    by_key = ctx.state_layouts
    for tm in tms:
        _run_graph(ctx, tm, used, by_key)
    for tm in tms:  # tied keys that no placeholder carries share their tensor's layout
        for k, others in tm.aliases.items():
            for o in others:
                if k in by_key and o not in by_key:
                    by_key[o] = by_key[k]
    return ctx


def _run_graph(ctx: Context, tm: TracedModel, used: set, by_key: dict) -> None:
    dead = tm.dead_nodes
    for node in tm.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            shp = ctx.shape(node)
            if shp is None:
                continue
            kind = tm.placeholder_kind.get(node.name, "input")
            key = tm.placeholder_key.get(node.name)
            floating = node.meta["val"].is_floating_point()
            if kind in ("param", "buffer") and floating and key not in used:
                ctx.layouts[node] = ctx.pinned_layout(shp, UNUSED)
            elif kind in ("param", "buffer") and floating:
                ctx.layouts[node] = ctx.fresh_layout(shp)
            else:
                why = {"param": "integer parameter", "buffer": "integer buffer", "input": "model input",
                       "nonpersistent": "non-persistent buffer (not in the state dict)",
                       "constant": "constant tensor"}[kind]
                # an axis the tensor is the same along is unchanged by any permutation: free, not pinned
                uniform = tm.uniform_axes.get(node.name, (False,) * len(shp))
                ctx.layouts[node] = tuple(ctx.fresh(n) if same else ctx.fresh(n, f"{why} at {ctx.where}")
                                          for n, same in zip(shp, uniform))
            if key is not None:  # one tensor, one layout: in another graph, or tied under another key
                for other in (key, *tm.aliases.get(key, ())):
                    if other in by_key:
                        ctx.unify(by_key[other], ctx.layouts[node])
                by_key[key] = ctx.layouts[node]
        elif node.op == "call_function":
            ctx.layouts[node] = None if node in dead else _call(ctx, node)
        elif node.op == "output":
            for a in node.all_input_nodes:
                target = tm.mutations.get(a.name)
                if target in by_key and ctx.lay(a) is not None:  # the buffer's new value: permuted as the buffer
                    ctx.unify(by_key[target], ctx.lay(a))
                else:
                    ctx.pin_layout(ctx.lay(a), "model output")
        elif node.op == "get_attr":
            shp = ctx.shape(node)
            ctx.layouts[node] = ctx.pinned_layout(shp, "graph attribute") if shp is not None else None
        else:
            ctx.layouts[node] = _default_rule(ctx, node, f"unsupported node kind {node.op}")


def _used_keys(tm: TracedModel) -> set:
    """State-dict keys whose tensor (or a tied alias of it) feeds the graph."""
    dead = tm.dead_nodes
    keys = {tm.placeholder_key[n.name] for n in tm.graph.nodes
            if n.op == "placeholder" and any(u not in dead for u in n.users) and n.name in tm.placeholder_key}
    return keys | {o for k in keys for o in tm.aliases.get(k, ())}


def _call(ctx: Context, node: Node):
    if node.target is operator.getitem:
        seq, i = node.args
        lay = ctx.lay(seq)
        return lay[i] if isinstance(lay, list) else _default_rule(ctx, node, "getitem on a non-sequence")
    rule = get_rule(node.target)
    if rule is None and isinstance(node.target, torch._ops.HigherOrderOperator) and _body(node) is not None:
        ctx.wrappers.add(node)
        return _check(ctx, node, _call_body(ctx, node))
    if rule is None:
        return _default_rule(ctx, node, f"no rule for {_target_name(node.target)}")
    try:
        out = rule(ctx, *node.args, **node.kwargs)
    except Exception as e:  # noqa: BLE001 - a failing rule pins instead of crashing
        return _default_rule(ctx, node, f"rule for {_target_name(node.target)} failed ({type(e).__name__}: {e})")
    return _check(ctx, node, out)


_WRAPPERS = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}


def _body(node: Node):
    """``(graph module, operands)`` of a higher-order op that runs a submodule's graph on its operands unchanged
    but for grad mode / autocast (values, hence couplings, are those of the body); else None."""
    if _target_name(node.target) not in _WRAPPERS:
        return None
    for i, a in enumerate(node.args):
        if isinstance(a, Node) and a.op == "get_attr":
            gm = getattr(node.graph.owning_module, a.target, None)
            if isinstance(gm, torch.fx.GraphModule):
                return gm, node.args[i + 1:]
            return None
    return None


def _call_body(ctx: Context, node: Node):
    """Analyse the wrapped graph in place: its placeholders carry the operands' layouts, every op its own rule;
    the outputs' layouts are the wrapper's (a list, read by getitem)."""
    gm, operands = _body(node)
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(operands):
        raise ValueError(f"{len(operands)} operands for {len(phs)} placeholders")
    out = None
    try:
        for n in gm.graph.nodes:
            ctx.node = n
            if n.op == "placeholder":
                ctx.layouts[n] = ctx.layouts.get(operands[phs.index(n)]) if isinstance(operands[phs.index(n)], Node) else None
            elif n.op == "call_function":
                ctx.layouts[n] = _call(ctx, n)
            elif n.op == "get_attr":
                shp = ctx.shape(n)
                ctx.layouts[n] = ctx.pinned_layout(shp, "graph attribute") if shp is not None else None
            elif n.op == "output":
                res = n.args[0]
                res = list(res) if isinstance(res, (list, tuple)) else [res]
                out = [ctx.lay(r) if isinstance(r, Node) else None for r in res]
            else:
                ctx.layouts[n] = _default_rule(ctx, n, f"unsupported node kind {n.op}")
    finally:
        ctx.node = node
    return out


def _check(ctx: Context, node: Node, out):
    """A rule's output must match the node's shapes; a mismatch is a rule bug and pins."""
    shp = ctx.out_shape()
    if isinstance(out, Stacked):
        return out if _check(ctx, node, out.parts[0]) is out.parts[0] else _default_rule(
            ctx, node, f"rule for {_target_name(node.target)} returned a wrong layout")
    ok = (isinstance(shp, list) and isinstance(out, list) and len(out) == len(shp)
          and all(o is None or (s is not None and len(o) == len(s) and all(ctx.size(a) == n for a, n in zip(o, s)))
                  for o, s in zip(out, shp))) or (
        isinstance(shp, tuple) and isinstance(out, tuple) and len(out) == len(shp)
        and all(ctx.size(a) == n for a, n in zip(out, shp))) or (shp is None and out is None)
    return out if ok else _default_rule(ctx, node, f"rule for {_target_name(node.target)} returned a wrong layout")


def infer_spec(model: torch.nn.Module, example_inputs, *, modes: Sequence[str] | None = None,
               maps: bool | Sequence[str] = False) -> PermutationSpec:
    """Infer every permutation of hidden units that leaves ``model``'s function unchanged.

    ``example_inputs`` is a tensor or a tuple of tensors; the graph is
    specialised to their shapes. ``modes`` lists the modes to trace, ``"eval"``
    and/or ``"train"``: the spec holds in each of them. By default the model's
    current mode is traced, and the other mode as well when some parameters go
    unused in the first (auxiliary heads that run only in train mode). The
    model is not modified.

    ``maps`` also infers continuous symmetries (``spec.maps``, ``spec.map_pins``; see
    :func:`autoperm.maps.infer_maps`): ``True`` for the default kinds, or the kinds to infer.

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoperm.infer_spec(mlp, torch.randn(1, 4))
    >>> [(g.name, g.size) for g in spec.groups]
    [('0.weight:0', 8)]
    >>> len(autoperm.infer_spec(mlp, torch.randn(2, 4), modes=("eval", "train")).groups)
    1
    """
    ctx, tms, spec = analyse(model, example_inputs, modes=modes)
    if maps is False or maps is None:
        return spec
    from .maps.infer import maps_from_analysis
    return maps_from_analysis(ctx, tms, spec, None if maps is True else tuple(maps))


def analyse(model: torch.nn.Module, example_inputs, *, modes: Sequence[str] | None = None):
    """``(context, traced graphs, spec)``: :func:`infer_spec` with the analysis it ran (``Context.layouts``,
    ``Context.group_roots``, ``Context.per_roots``), for analyses built on the atoms (``autoperm.maps``)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"infer_spec needs a torch.nn.Module, got {type(model).__name__}")
    if modes is not None and (not modes or set(modes) - {"eval", "train"}):
        raise ValueError(f"modes must name 'eval' and/or 'train', got {modes!r}")
    current = mode_of(model)
    tms = [_trace_in(model, example_inputs, m) for m in dict.fromkeys(modes or (current,))]
    params = {k for k, p in model.named_parameters() if p.is_floating_point()}
    if modes is None and params - _used_keys(tms[0]):
        try:  # a module that runs only in the other mode reads these: trace that mode too
            tms.append(_trace_in(model, example_inputs, "eval" if current == "train" else "train"))
        except TraceError:
            pass  # the warning below says the spec covers the traced mode only
    ctx = _run(*tms)
    spec = _build_spec(ctx, model)
    unused = sorted(params - set().union(*(_used_keys(tm) for tm in tms)))
    if unused:
        traced = " and ".join(tm.mode for tm in tms)
        untraced = [m for m in ("eval", "train") if m not in {tm.mode for tm in tms}]
        tail = (f"modules that run only in {untraced[0]} mode (auxiliary heads) may read permuted channels; "
                f"the spec is exact for {traced} mode") if untraced else "they stay unpermuted"
        warnings.warn(f"{len(unused)} parameters are not used by the graph traced in {traced} mode "
                      f"({', '.join(unused[:3])}{' ...' if len(unused) > 3 else ''}): {tail}", stacklevel=3)
    return ctx, tms, spec


def _trace_in(model: torch.nn.Module, example_inputs, mode: str) -> TracedModel:
    """Trace ``model`` in ``mode``; every submodule's own train/eval flag is restored afterwards."""
    if mode == mode_of(model):
        return trace(model, example_inputs)
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        return trace(model, example_inputs)
    finally:
        for m, flag in flags:
            m.training = flag


def _build_spec(ctx: Context, model: torch.nn.Module) -> PermutationSpec:
    atoms = ctx.atoms
    state = model.state_dict()
    by_key = ctx.state_layouts
    names: dict[int, str] = {}
    axes: dict[str, list] = {}
    pinned: list[Pin] = []

    def expr(a: int, label: str):
        r = atoms.root(a)
        if r.size <= 1:
            return None
        if r.kind is not None:
            kids = [expr(c, f"{label}.{i}") for i, c in enumerate(r.children)]
            if all(k is None for k in kids):
                return None
            return _merge_fixed(r.kind, [k if k is not None else {"fixed": atoms.size(c)} for k, c in zip(kids, r.children)])
        if r.pinned is not None:
            return None
        root = atoms.find(a)
        names.setdefault(root, label)
        return {"g": names[root]}

    def pins(a: int, key: str, axis: int):
        r = atoms.root(a)
        if r.size <= 1:
            return
        if r.kind is not None:
            for c in r.children:
                pins(c, key, axis)
        elif r.pinned is not None:
            pinned.append(Pin(key, axis, r.size, r.pinned))

    for key, t in state.items():
        lay = by_key.get(key)
        if lay is None or not t.is_floating_point():
            if t.dim() and t.is_floating_point():
                pinned.extend(Pin(key, i, s, UNUSED) for i, s in enumerate(t.shape) if s > 1)
            continue
        axes[key] = [expr(a, f"{key}:{i}") for i, a in enumerate(lay)]
        for i, a in enumerate(lay):
            pins(a, key, i)
    sizes = {}
    for root, name in names.items():
        sizes[name] = atoms.size(root)
    ctx.per_roots = per_block(ctx, by_key)
    ctx.group_roots = {name: root for root, name in names.items()}
    per = {names[d]: names[h] for d, h in ctx.per_roots.items() if d in names and h in names}
    shapes = {k: list(t.shape) for k, t in state.items()}
    try:
        return PermutationSpec.from_axes(axes, sizes, pinned, shapes, unsupported=ctx.unsupported, per=per)
    except ValueError as e:  # an engine bug: keep the inner groups shared (sound) and say so
        warnings.warn(f"independent per-block groups dropped: {e}", stacklevel=4)
        return PermutationSpec.from_axes(axes, sizes, pinned, shapes, unsupported=ctx.unsupported)


def _merge_fixed(kind: str, parts: list) -> dict:
    """Fuse neighbouring fixed parts (their sizes multiply in a product, add in a concatenation)."""
    out: list = []
    for p in parts:
        if "fixed" in p and out and "fixed" in out[-1]:
            a, b = out[-1]["fixed"], p["fixed"]
            out[-1] = {"fixed": a * b if kind == "prod" else a + b}
        else:
            out.append(p)
    return out[0] if len(out) == 1 else {kind: out}


def axis_graph(model: torch.nn.Module, example_inputs) -> nx.Graph:
    """The (state-dict key, axis) graph: an edge joins two axes that share a permutation group.

    >>> import torch
    >>> g = axis_graph(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)), torch.randn(1, 4))
    >>> import networkx as nx
    >>> sorted(nx.node_connected_component(g, ("0.weight", 0)))
    [('0.bias', 0), ('0.weight', 0), ('1.weight', 1)]
    """
    spec = infer_spec(model, example_inputs)
    g = nx.Graph()
    for grp in spec.groups:
        nodes = sorted({(m.key, m.axis) for m in grp.members})
        g.add_nodes_from(nodes, group=grp.name)
        nx.add_path(g, nodes)
    return g
