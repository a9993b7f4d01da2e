"""State-dict arithmetic: linear interpolation and averaging.

Only floating (and complex) tensors are interpolated. Integer and boolean buffers, such as
BatchNorm's ``num_batches_tracked``, are counters or masks: a weighted mean of them means
nothing, so they are taken from the first state.
"""
from __future__ import annotations

from typing import Collection, Mapping, Sequence

import torch

from .._load import keep_metadata

__all__ = ["interpolate_states", "average_states", "is_interpolable", "check_same_keys"]


def is_interpolable(t) -> bool:
    """True for floating or complex tensors: the ones interpolation and averaging touch."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def check_same_keys(*states: Mapping) -> None:
    """Raise KeyError naming the first keys that one state has and another lacks."""
    first = set(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != first:
            only0, only_i = sorted(first - set(s))[:3], sorted(set(s) - first)[:3]
            raise KeyError(f"state dicts 0 and {i} differ: only in 0: {only0}, only in {i}: {only_i}")


def interpolate_states(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], lam: float,
                       keys: Collection[str] | None = None) -> dict:
    """``(1 − lam)·state_a + lam·state_b`` for every floating tensor; a new dict, inputs untouched.

    Integer buffers (``num_batches_tracked``) and non-tensors come from ``state_a``. With
    ``keys``, only those keys are interpolated and every other one is held at ``state_a``
    (layer-wise interpolation). ``lam`` 0 and 1 return exactly A's and B's values.

    >>> a = {"w": torch.zeros(2), "n": torch.tensor(3)}
    >>> b = {"w": torch.ones(2), "n": torch.tensor(7)}
    >>> s = interpolate_states(a, b, 0.25)
    >>> s["w"].tolist(), s["n"].item()
    ([0.25, 0.25], 3)
    """
    check_same_keys(state_a, state_b)
    if keys is not None:
        missing = set(keys) - set(state_a)
        if missing:
            raise KeyError(f"keys not in the state dicts: {sorted(missing)[:3]}")
    out = {}
    for k, a in state_a.items():
        b = state_b[k]
        if (keys is not None and k not in keys) or not is_interpolable(a):
            out[k] = a
            continue
        if a.shape != b.shape:
            raise ValueError(f"{k!r}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
        out[k] = torch.lerp(a, b.to(device=a.device, dtype=a.dtype), float(lam))
    return keep_metadata(out, state_a)


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None) -> dict:
    """The weighted mean of several state dicts (uniform by default); integer buffers from the first.

    >>> average_states([{"w": torch.tensor([0.0])}, {"w": torch.tensor([3.0])}])["w"].tolist()
    [1.5]
    """
    if not states:
        raise ValueError("average_states needs at least one state dict")
    check_same_keys(*states)
    w = [1.0 / len(states)] * len(states) if weights is None else [float(x) for x in weights]
    if len(w) != len(states):
        raise ValueError(f"{len(w)} weights for {len(states)} state dicts")
    out = {}
    for k, first in states[0].items():
        if not is_interpolable(first):
            out[k] = first
            continue
        acc = torch.zeros_like(first, dtype=torch.float64 if not first.is_complex() else torch.complex128)
        for wi, s in zip(w, states):
            acc += wi * s[k].to(device=first.device, dtype=acc.dtype)
        out[k] = acc.to(first.dtype)
    return keep_metadata(out, states[0])
