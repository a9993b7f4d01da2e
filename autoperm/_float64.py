"""Float64 copies of a model and its inputs: the reference run that tells float32 round-off from a real change."""
from __future__ import annotations

import copy

import torch

__all__ = ["float64_model", "float64_inputs", "is_float64"]


def is_float64(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` already is float64."""
    return all(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (same mode); ``model`` is not modified."""
    return copy.deepcopy(model).double()


def float64_inputs(x):
    """``x`` (a tensor, or a tuple or list of them and other values) with floating-point tensors in float64.

    >>> float64_inputs((torch.ones(1), 3))[0].dtype
    torch.float64
    """
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(float64_inputs(a) for a in x)
    return x
