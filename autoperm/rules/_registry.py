"""The rule registry: one function per op, declaring how the op couples its tensors' axes.

A rule is called as ``rule(ctx, *node.args, **node.kwargs)`` and returns the
output layout: a tuple of atoms (one per output axis), or a list of such
tuples for ops returning several tensors. Ops without a rule pin every axis
they touch (see ``autoperm._infer``).
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_rule", "builtin_rule", "get_rule", "list_rules", "is_registered", "NameTable", "op_names"]

_RULES: dict[object, Callable] = {}


def op_names(node) -> tuple[str, str]:
    """``(namespace.op.overload, namespace.op)`` of a graph node's target; a plain callable's name twice."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}.{t._overloadname}", f"{t.namespace}.{t._opname}"
    n = getattr(t, "__name__", str(t))
    return n, n


class NameTable(dict):
    """Functions keyed by op name: ``aten.op`` for any overload, ``aten.op.overload`` for one (which wins)."""

    def register(self, *names):
        def deco(fn):
            for n in names:
                self[n] = fn
            return fn
        return deco

    def lookup(self, node) -> Callable | None:
        full, packet = op_names(node)
        return self.get(full) or self.get(packet)


def _keys(target, missing_ok: bool) -> list[object]:
    if isinstance(target, str):
        ns, _, rest = target.partition(".")
        packet, _, overload = rest.partition(".")
        try:
            op = getattr(getattr(torch.ops, ns), packet)
            return [getattr(op, overload)] if overload else [op]
        except (AttributeError, RuntimeError):
            if missing_ok:  # an op a library registers later (a custom op): matched by name
                return [target]
            raise ValueError(f"no op named {target!r} in this torch") from None
    return [target]


def builtin_rule(*targets):
    """Register one of autoperm's own rules. An op not registered yet (absent from this torch, or a custom op a
    library registers on import, such as ``transformers.grouped_mm_fallback``) is matched by its name later."""
    return register_rule(*targets, missing_ok=True)


def register_rule(*targets, override: bool = False, missing_ok: bool = False):
    """Register ``fn`` as the rule for each target (an ATen overload, an overload packet, a callable or a name).

    A packet (``torch.ops.aten.add`` or ``"aten.add"``) covers all its overloads.
    Registering a target twice raises unless ``override=True``.

    >>> import torch
    >>> from autoperm.rules import register_rule, get_rule
    >>> @register_rule("aten.erfinv.default", override=True)
    ... def erfinv(ctx, x):
    ...     '''Element-wise: out ~ x.'''
    ...     return ctx.lay(x)
    >>> get_rule(torch.ops.aten.erfinv.default) is erfinv
    True
    """

    def deco(fn: Callable) -> Callable:
        for t in targets:
            for k in _keys(t, missing_ok):
                if k in _RULES and not override:
                    raise ValueError(f"a rule for {k} is already registered; pass override=True")
                _RULES[k] = fn
        return fn

    return deco


def get_rule(target) -> Callable | None:
    """The rule for ``target``: its own, else its overload packet's, else None."""
    if target in _RULES:
        return _RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    return _RULES.get(packet) or _RULES.get(str(target)) or _RULES.get(str(packet))


def is_registered(target) -> bool:
    return get_rule(target) is not None


def list_rules() -> list[str]:
    return sorted(str(k) for k in _RULES)
