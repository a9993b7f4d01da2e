"""Id tensors: integer tensors whose VALUES are positions along an axis (expert ids from ``topk``, ``argsort``).

A rule that makes such a tensor records the atom its values address (its *domain*): when the
domain's atom is permuted by π, the tensor's values become π(values). A rule that indexes an axis
with an id tensor of that domain may then tie the axis to the domain instead of pinning it, since
``x'[π(i)] = x[i]``. Domains pass through value-preserving ops (casts, reshapes, slicing); any other
op makes new values with no domain, so an unknown op can never carry a domain on.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch.fx import Node

# ops that move or copy values without changing them (a cast keeps small integers exact)
_KEEP = {"view", "reshape", "_unsafe_view", "to", "_to_copy", "clone", "contiguous", "alias", "detach",
         "lift_fresh_copy", "expand", "unsqueeze", "squeeze", "flatten", "permute", "transpose", "t", "select",
         "slice", "narrow", "view_as", "type_as"}
_EXACT = {torch.int16, torch.int32, torch.int64, torch.float32, torch.float64}


def _domains(ctx) -> dict:
    """The id domains recorded during one analysis (kept on the analysis context)."""
    d = getattr(ctx, "id_domains", None)
    if d is None:
        d = ctx.id_domains = {}
    return d


def set_domain(ctx, key, atom: int) -> None:
    """Record that the values of ``key`` (a node, or ``(node, i)`` for output ``i``) address ``atom``."""
    _domains(ctx)[key] = atom


def source(node):
    """Follow value-preserving ops back from ``node``; returns the node (or (node, i) key) that made its values."""
    while isinstance(node, Node):
        if node.target is operator.getitem and isinstance(node.args[0], Node):
            return (node.args[0], node.args[1])
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        val = node.meta.get("val")
        if name in _KEEP and isinstance(val, torch.Tensor) and val.dtype in _EXACT and isinstance(node.args[0], Node):
            node = node.args[0]
            continue
        return node
    return node


def domain(ctx, x) -> int | None:
    """The atom the values of ``x`` address, or None when unknown."""
    if not isinstance(x, Node):
        return None
    return _domains(ctx).get(source(x))


def address(ctx, axis_atom: int, index, why: str = "axis addressed by an index tensor") -> None:
    """``axis_atom`` is read at positions given by ``index``: tie it to the index's domain, else pin it
    (and the domain, whose relabelled values would otherwise read other positions)."""
    dom = domain(ctx, index)
    if dom is not None and ctx.size(dom) == ctx.size(axis_atom):
        ctx.union(axis_atom, dom)
        return
    ctx.pin(axis_atom, why)
    if dom is not None:
        ctx.pin(dom, f"ids address an axis of another size ({why})")


def drop(ctx, x, why: str) -> None:
    """A consumer that cannot use the ids' domain: the domain is pinned (the values then never change)."""
    dom = domain(ctx, x)
    if dom is not None:
        ctx.pin(dom, why)


# where each id-aware op reads ids: positional argument numbers (a list argument: every entry)
AWARE = {"index": 1, "_unsafe_index": 1, "index_put": 1, "index_put_": 1, "index_select": 2, "gather": 2,
         "embedding": 1, "one_hot": 0, "histc": 0, "bincount": 0, "sort": 0, "scatter": 2, "scatter_": 2,
         "scatter_add": 2, "scatter_add_": 2, "scatter_reduce": 2, "scatter_reduce_": 2, "index_add": 2,
         "index_add_": 2}


def used_as_ids(node, start=None) -> bool:
    """True when every use of ``node``'s values (output ``start[1]`` of ``start[0]`` when given; through
    value-preserving ops) is by an id-aware rule in an id position: only then may their domain move."""
    stack = [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            name = getattr(getattr(u.target, "overloadpacket", None), "__name__", "")
            if u.target is operator.getitem:
                if start is not None and n is start[0] and u.args[1] == start[1]:
                    stack.append(u)
                elif start is None or n is not start[0]:
                    return False
                continue
            if name == "_assert_tensor_metadata":
                continue
            val = u.meta.get("val")
            if name in _KEEP and u.args[0] is n and isinstance(val, torch.Tensor) and val.dtype in _EXACT:
                stack.append(u)
                continue
            at = AWARE.get(name)
            if at is None or len(u.args) <= at:
                return False
            arg = u.args[at]
            if not (arg is n or (isinstance(arg, (list, tuple)) and n in arg)):
                return False
            if any(a is n for i, a in enumerate(u.args) if i != at):
                return False
    return True


def id_aware(fn):
    """Decorate a rule that reads ids: if it fails (the engine then pins its operands' axes), the ids' domains are
    pinned too, so that no id tensor's relabelled values reach an op that treats them as plain numbers."""
    @functools.wraps(fn)
    def rule(ctx, *args, **kwargs):
        try:
            return fn(ctx, *args, **kwargs)
        except Exception:
            for a in [*args, *kwargs.values()]:
                for t in (a if isinstance(a, (list, tuple)) else [a]):
                    drop(ctx, t, "ids read by an op whose rule failed")
            raise
    return rule
