"""Proving that whole modules (experts in an ``nn.ModuleList``) may move with the routing's expert axis.

Routing code that loops over a ``ModuleList`` weighs expert ``e``'s output by the routing tensor's
entry ``e`` (``combine[:, e:e+1] * expert_e(h)``) and sums the results. Permuting the expert axis
``E`` of the router by ``π`` while moving module ``π(i)`` into slot ``i`` keeps the function when:

1. module ``i``'s parameters (keys ``prefix_i*``) and its *selectors* (a ``select`` or one-wide
   ``slice`` at the constant index ``i`` of a routing tensor ``T``, along an axis of size ``E``; one
   per such tensor that feeds the module's computation alone, e.g. the routing weights and a
   per-expert scale) feed a *chain* of nodes that nothing outside the chain reads, except one exit;
2. the exits are summed by a tree of ``add`` nodes (other leaves: values no chain depends on) whose
   partial sums nothing else reads;
3. every chain is the same graph as chain 0 (node for node: same op, same constants, the same
   nodes from outside, its own parameters under the same relative key, its own selector);
4. (after the rules) the selected axes of all those tensors carry one free leaf atom ``A`` (the
   selectors tie them), and neither the chains nor the values they read from outside carry ``A``.

Then the selectors see ``T`` permuted by ``π`` (the rules prove ``T`` equivariant in ``A``), so
slot ``i``'s chain computes with module ``π(i)``'s weights and selector exactly what chain
``π(i)`` computed before: the exits are permuted and their sum is unchanged. Conditions 1-3 are
checked on the graph before the rules run (``find_module_moves``); only then are the selectors
exempt from the slice rule (whose refinement would split ``A`` into one-wide pieces); condition
4 is checked after (``settle_module_moves``), and where it fails ``A`` is pinned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Node

__all__ = ["ModuleMove", "find_module_moves", "selector_rule", "settle_module_moves"]

_ADD = {torch.ops.aten.add.Tensor}
_SLICE = {torch.ops.aten.slice.Tensor}
_SELECT = {torch.ops.aten.select.int}


@dataclass
class ModuleMove:
    """A ``ModuleList`` whose modules the graph selects by the index of one routing axis (conditions 1-3)."""

    prefixes: tuple[str, ...]
    slots: list[list[Node]]  # the selectors of each module, one per routing tensor, in one order
    picks: dict  # selector -> (routing tensor T, selected axis)
    chains: list[set] = field(default_factory=list)  # nodes of each chain (its parameters and selector included)
    outside: set = field(default_factory=set)  # values from outside the chains that they or the sum read
    atom: int | None = None  # the selected axes' atom, set when the selectors run

    @property
    def selectors(self) -> list[Node]:
        return [x for slot in self.slots for x in slot]


def _families(tm) -> dict[str, dict[int, dict[str, Node]]]:
    """``{base: {index: {relative key: placeholder}}}`` for every numbered module list in the graph's keys."""
    fams: dict = {}
    for n in tm.graph.nodes:
        key = tm.placeholder_key.get(n.name) if n.op == "placeholder" else None
        if key is None:
            continue
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                fams.setdefault(".".join(parts[:i]), {}).setdefault(int(part), {})[".".join(parts[i + 1:])] = n
    return fams


def _selector(n: Node):
    """``(T, dim, index)`` if ``n`` takes one constant index of an axis (select, or a one-wide slice), else None."""
    if n.op != "call_function" or not isinstance(n.args[0], Node):
        return None
    val = n.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    args = list(n.args) + [None] * 5
    if n.target in _SELECT and not n.kwargs:
        dim, idx = args[1], args[2]
    elif n.target in _SLICE and not n.kwargs:
        dim, start, end, step = (args[1] if args[1] is not None else 0), args[2], args[3], args[4]
        if not (isinstance(start, int) and isinstance(end, int) and step in (None, 1) and end == start + 1):
            return None
        idx = start
    else:
        return None
    if not isinstance(dim, int) or not isinstance(idx, int) or not -val.dim() <= dim < val.dim():
        return None
    dim %= val.dim()
    size = int(val.shape[dim])
    return (n.args[0], dim, idx % size) if -size <= idx < size else None


def find_module_moves(tm) -> list[ModuleMove]:
    """The module lists of ``tm``'s graph that satisfy conditions 1-3 (see the module docstring)."""
    order = {n: i for i, n in enumerate(tm.graph.nodes)}
    sels: dict = {}
    for n in tm.graph.nodes:
        s = _selector(n)
        if s is not None:
            sels.setdefault((s[0], s[1]), {}).setdefault(s[2], []).append(n)
    out, claimed = [], set()
    for base, fam in _families(tm).items():
        n = len(fam)
        if n < 2 or set(fam) != set(range(n)) or any(set(fam[i]) != set(fam[0]) for i in fam):
            continue
        prefixes = tuple(f"{base}.{i}." if base else f"{i}." for i in range(n))
        groups = [(src, dim, [by_index[i][0] for i in range(n)]) for (src, dim), by_index in sels.items()
                  if int(src.meta["val"].shape[dim]) == n and set(by_index) == set(range(n))
                  and all(len(v) == 1 and v[0] not in claimed for v in by_index.values())]
        if not groups:
            continue
        reach = [_descendants(fam[i].values()) for i in range(n)]
        own = [reach[i] - set().union(*(reach[j] for j in range(n) if j != i)) for i in range(n)]
        groups = [g for g in groups if all(_descendants([g[2][i]]) & own[i] for i in range(n))]
        if not groups:  # no routing tensor whose entry i reaches module i's computation alone
            continue
        move = ModuleMove(prefixes, [[g[2][i] for g in groups] for i in range(n)],
                          {x: (src, dim) for src, dim, xs in groups for x in xs})
        if _prove(move, fam, order):
            claimed.update(move.selectors)
            out.append(move)
    return out


def _descendants(sources) -> set:
    seen, stack = set(sources), list(sources)
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _is_sum(n) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in _ADD and len(n.args) == 2 \
        and n.kwargs.get("alpha", 1) == 1


def _prove(move: ModuleMove, fam: dict, order: dict) -> bool:
    n = len(move.slots)
    sources = [set(fam[i].values()) | set(move.slots[i]) for i in range(n)]
    dep: dict = {}
    for i, s in enumerate(sources):
        for x in _descendants(s):
            dep.setdefault(x, set()).add(i)
    if any(len(dep[x]) > 1 for s in sources for x in s):
        return False
    full = [x for x, d in dep.items() if len(d) == n]
    if not full:
        return False
    top = min(full, key=order.get)
    sums, exits, leaves, stack = set(), {}, set(), [top]
    while stack:  # the tree of adds whose leaves are the exits and values no chain depends on
        m = stack.pop()
        if not _is_sum(m):
            return False
        sums.add(m)
        ds = [dep.get(a, set()) if isinstance(a, Node) else set() for a in m.args]
        if ds[0] & ds[1] or ds[0] | ds[1] != dep[m]:
            return False
        for a, d in zip(m.args, ds):
            if not d:
                if isinstance(a, Node):
                    leaves.add(a)
            elif len(d) > 1 or (_is_sum(a) and any(isinstance(b, Node) and not dep.get(b) or not isinstance(b, Node)
                                                   for b in a.args)):
                stack.append(a)
            else:
                (e,) = d
                if e in exits:
                    return False
                exits[e] = a
    if set(exits) != set(range(n)):
        return False
    if any(m is not top and not set(m.users) <= sums for m in sums):
        return False
    chains = [{x for x, d in dep.items() if d == {i} and x not in sums} for i in range(n)]
    for i, c in enumerate(chains):
        for x in c:
            ok = set(x.users) <= sums if x is exits[i] else set(x.users) <= c
            if not ok or x.op == "output":
                return False
    if not all(_same_chain(move, fam, chains, exits, order, i) for i in range(1, n)):
        return False
    move.chains = chains
    inside = set().union(*chains)
    move.outside = leaves | {a for c in chains for x in c if x not in move.picks  # T is read through them only
                            for a in x.all_input_nodes if a not in inside}
    return True


def _same_chain(move, fam, chains, exits, order, i) -> bool:
    """Chain ``i`` is chain 0's graph with module ``i``'s parameters and selector (condition 3)."""
    to0 = {**dict(zip(move.slots[i], move.slots[0])), **{fam[i][k]: fam[0][k] for k in fam[0]}}
    body0 = sorted(chains[0] - set(to0.values()), key=order.get)
    body = sorted(chains[i] - set(to0), key=order.get)
    if len(body0) != len(body):
        return False
    to0.update(zip(body, body0))

    def same(a, b) -> bool:
        if isinstance(a, Node) or isinstance(b, Node):
            if not (isinstance(a, Node) and isinstance(b, Node)):
                return False
            return to0[a] is b if a in chains[i] else (a is b and b not in chains[0])
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) or isinstance(b, dict):
            return type(a) is type(b) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and a == b

    for x, y in zip(body, body0):
        if x.op != y.op or x.target != y.target or not same(x.args, y.args) or not same(x.kwargs, y.kwargs):
            return False
        vx, vy = x.meta.get("val"), y.meta.get("val")
        if isinstance(vx, torch.Tensor) != isinstance(vy, torch.Tensor) or (
                isinstance(vx, torch.Tensor) and (vx.shape != vy.shape or vx.dtype != vy.dtype)):
            return False
    return bool(body) and to0.get(exits[i]) is exits[0]


def selector_rule(ctx, node: Node, move: ModuleMove):
    """A selector of a proven module move: the other axes pass through; the selected axis is not refined
    (its atom is the expert axis, checked after the rules) and a kept one-wide axis gets a fresh atom."""
    src, dim = move.picks[node]
    lay = list(ctx.lay(src))
    move.atom = lay[dim] if move.atom is None else move.atom
    ctx.union(move.atom, lay[dim])
    if node.target in _SELECT:
        del lay[dim]
    else:
        lay[dim] = ctx.fresh(1)
    return tuple(lay)


def _leaves(atoms, a) -> set:
    r = atoms.root(a)
    if r.kind is None:
        return {atoms.find(a)} if r.size > 1 else set()
    return set().union(*(_leaves(atoms, c) for c in r.children))


def settle_module_moves(ctx, proofs: dict, users: dict) -> list[tuple[ModuleMove, int]]:
    """Condition 4, and every graph that reads a module list must prove it: the moves that hold, as
    ``(move, expert atom)``; the expert atom of every other is pinned with the reason."""
    atoms, out = ctx.atoms, []
    for prefixes, moves in proofs.items():
        a = moves[0].atom
        why = None
        if any(m.atom is None for m in moves):
            continue  # a selector never ran (dead code): nothing was exempted
        if len(moves) != users.get(prefixes, 0):
            why = "a traced graph reads the modules without selecting them by this axis"
        elif any(atoms.find(m.atom) != atoms.find(a) for m in moves):
            why = "the graphs select the modules by different axes"
        elif atoms.root(a).kind is not None:
            why = "the expert axis is cut into parts"
        elif atoms.root(a).pinned is None:
            for m in moves:
                seen = [x for c in m.chains for x in c] + list(m.outside)
                hit = next((x for x in seen if atoms.find(a) in
                            set().union(set(), *(_leaves(atoms, b) for b in _flat(ctx.layouts.get(x))))), None)
                if hit is not None:
                    why = f"{hit.name} reads the expert axis inside or beside the modules"
                    break
        if why is not None:
            atoms.pin(a, f"modules {prefixes[0]}... selected by routing: {why} at {moves[0].selectors[0].name}")
        elif atoms.root(a).pinned is None:
            out.append((moves[0], a))
    return out


def _flat(layout) -> list:
    if layout is None:
        return []
    if isinstance(layout, list):
        return [a for item in layout for a in _flat(item)]
    if hasattr(layout, "parts"):
        return [a for p in layout.parts for a in p]
    return list(layout)
