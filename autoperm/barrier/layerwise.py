"""Layer-wise barriers: interpolate one layer (or block) at a time, the rest held at model A.

Singh et al. 2024 ("Landscaping Linear Mode Connectivity") show that the barrier of the whole
path is carried unevenly by the layers and that layer-wise barriers predict where it comes from.
Here a "layer" is a set of state-dict keys; by default, the tensors of one module (a Linear's
weight and bias, a BatchNorm's weight, bias and running statistics), or with ``depth`` the
tensors under a common key prefix of that many dotted components (``depth=2`` on a timm ResNet
gives blocks such as ``layer1.0``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ._state import is_interpolable
from .curve import Curve, interpolation_curve
from .norm import as_reiterable

__all__ = ["layer_groups", "layerwise_curves", "layerwise_barriers"]


def layer_groups(state: Mapping[str, torch.Tensor], depth: int | None = None) -> dict[str, list[str]]:
    """Group a state dict's floating keys into layers, in state-dict order.

    ``depth=None``: by owning module (the key without its last component); otherwise by the first
    ``depth`` components. Integer buffers are left out (they are never interpolated).

    >>> sd = {"0.weight": torch.ones(1), "0.bias": torch.ones(1), "2.weight": torch.ones(1)}
    >>> layer_groups(sd)
    {'0': ['0.weight', '0.bias'], '2': ['2.weight']}
    """
    groups: dict[str, list[str]] = {}
    for k, v in state.items():
        if not is_interpolable(v):
            continue
        parts = k.split(".")
        name = ".".join(parts[:-1] if depth is None else parts[:depth]) or parts[0]
        groups.setdefault(name, []).append(k)
    return groups


def layerwise_curves(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                     evaluate: Callable[[nn.Module], object], layers: Mapping[str, Sequence[str]] | None = None, *,
                     depth: int | None = None, lambdas: Sequence[float] | None = None,
                     reset_bn: Iterable | None = None) -> dict[str, Curve]:
    """One :class:`Curve` per layer: only that layer's tensors move from A to B.

    Args:
        model, state_a, state_b, evaluate, lambdas, reset_bn: as for ``interpolation_curve``
            (``state_b`` aligned to ``state_a``).
        layers: ``{name: keys}``; default :func:`layer_groups` of ``state_a`` with ``depth``.

    Returns:
        ``{layer name: Curve}`` in layer order. At λ = 1 the model is A with one layer of B, so
        without alignment the ends differ too: compare ``barrier`` values together with the ends.
    """
    if layers is None:
        layers = layer_groups(state_a, depth)
    if reset_bn is not None:
        reset_bn = as_reiterable(reset_bn)
    return {name: interpolation_curve(model, state_a, state_b, evaluate, lambdas, reset_bn=reset_bn, keys=set(keys))
            for name, keys in layers.items()}


def layerwise_barriers(curves: Mapping[str, Curve], metric: str = "loss", kind: str = "max_mean") -> dict[str, float]:
    """``{layer: barrier}`` from :func:`layerwise_curves`' result."""
    return {name: c.barrier(metric, kind) for name, c in curves.items()}
