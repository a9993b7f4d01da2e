"""Reading a graph node's arguments and shapes, for the tables that describe ops by signature."""
from __future__ import annotations

import torch

__all__ = ["arg", "shape", "reduced_dims"]


def arg(node, i: int, name: str, default=None):
    """Argument ``i`` of ``node``, positional or by keyword ``name``."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def shape(x) -> tuple | None:
    """The shape of a graph value, or None for a non-tensor."""
    v = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def reduced_dims(node, i: int, name: str, n: int) -> list[int]:
    """The axes a reduction's ``dim`` argument names, non-negative (all ``n`` when none is given)."""
    d = arg(node, i, name)
    if d is None or (isinstance(d, (list, tuple)) and not d):
        return list(range(n))
    d = [d] if isinstance(d, int) else list(d)
    return [x % n for x in d]
