"""Copies of a model and its inputs in a wider dtype: the reference runs that tell round-off from a real change.

bfloat16 and float16 weights are checked on float32 copies, float32 ones fall back to float64; the
copies hold the very same values, so only the arithmetic gets more precise.
"""
from __future__ import annotations

import copy

import torch

__all__ = ["float64_model", "float64_inputs", "is_float64", "model_in", "inputs_in", "floating_dtype",
           "coarsest_dtype", "dtype_name"]


def is_float64(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` already is float64."""
    return all(t.dtype == torch.float64 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def model_in(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` (same mode) with every floating-point parameter and buffer in ``dtype``."""
    return copy.deepcopy(model).to(dtype)


def inputs_in(x, dtype: torch.dtype):
    """``x`` (a tensor, or a tuple or list of them and other values) with floating-point tensors in ``dtype``.

    >>> inputs_in((torch.ones(1), torch.ones(1, dtype=torch.long), 3), torch.bfloat16)[:2]
    (tensor([1.], dtype=torch.bfloat16), tensor([1]))
    """
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(inputs_in(a, dtype) for a in x)
    return x


def float64_model(model: torch.nn.Module) -> torch.nn.Module:
    """A float64 copy of ``model`` (same mode); ``model`` is not modified."""
    return model_in(model, torch.float64)


def float64_inputs(x):
    """``x`` with floating-point tensors in float64 (see :func:`inputs_in`).

    >>> float64_inputs((torch.ones(1), 3))[0].dtype
    torch.float64
    """
    return inputs_in(x, torch.float64)


def coarsest_dtype(tensors, default: torch.dtype = torch.float32) -> torch.dtype:
    """The floating-point dtype with the largest machine epsilon among ``tensors`` (``default`` if none).

    >>> coarsest_dtype([torch.ones(1), torch.ones(1, dtype=torch.bfloat16), torch.ones(1, dtype=torch.long)])
    torch.bfloat16
    """
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=default)


def floating_dtype(model: torch.nn.Module) -> torch.dtype:
    """The coarsest floating-point dtype of ``model``'s parameters and buffers (float32 if it has none)."""
    return coarsest_dtype((*model.parameters(), *model.buffers()))


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")
