"""Whether two weight sets of one architecture compute the same function, decided in a dtype that can tell.

Every check that an aligned or permuted model still computes what its source computes (``autoperm
align``, ``inspect --check``, the mergekit pre-pass, the fusion_bench algorithm) calls
:func:`same_function`. A permutation moves weights without changing their values, so a sound one
changes the outputs by arithmetic round-off only: about 1e-6 relative in float32, but about 1e-3
in bfloat16 or float16, more than any tolerance that still catches a subtly wrong permutation. So
the decision runs on float32 copies of the model, both weight sets and the inputs (the same
values, wider arithmetic), and on float64 copies where float32 round-off alone exceeds the
tolerance (deep nets with random weights). Where the wide copies cannot run (a model that
insists on its own dtype), it falls back to the stored dtype with a tolerance of
``FLOOR_FACTOR`` round-off floors.

The round-off floor is how much the outputs move when every weight moves by up to one rounding
unit of the stored dtype: the change a check in that dtype cannot see below. Every
:class:`Verdict` carries it beside the measured change, the dtype that decided and its tolerance.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import torch

from ._float64 import coarsest_dtype, dtype_name, floating_dtype, inputs_in, model_in
from ._load import keep_metadata, load_state_
from ._trace import as_tuple
from .check import relative_difference, run_outputs, validate_finite
from .permutation import apply_permutation, random_permutation
from .spec import PermutationSpec

__all__ = ["Verdict", "same_function", "invariance_verdict", "roundoff_perturb_", "TOLERANCE",
           "TOLERANCE_FLOAT64", "FLOOR_FACTOR"]

TOLERANCE = 1e-4  # largest relative output change that counts as unchanged (float32, deep nets)
TOLERANCE_FLOAT64 = 1e-9  # the same in float64, where round-off is about 1e-15
FLOOR_FACTOR = 3.0  # in the stored dtype: a change within this many round-off floors counts as round-off


@dataclass(frozen=True)
class Verdict:
    """The outcome of a function-preservation check; true when the outputs agree.

    ``change`` is the largest relative output change measured in ``dtype`` (the run that
    decided) and ``tolerance`` the bound it was held to; ``stored`` is the coarsest dtype of the
    weights and ``floor`` their round-off floor (see the module docstring); ``float32_change``
    is the float32 measurement when float64 decided. ``str(verdict)`` says all of it in one line.
    """

    ok: bool
    change: float
    tolerance: float
    dtype: torch.dtype
    stored: torch.dtype
    floor: float
    float32_change: float | None = None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        run = dtype_name(self.dtype) + (f" copies of the {dtype_name(self.stored)} weights"
                                        if self.dtype != self.stored else "")
        if self.float32_change is not None:
            run += f" (float32: {self.float32_change:.1e})"
        return (f"relative output change {self.change:.1e} in {run} {'<=' if self.ok else '>'} tolerance "
                f"{self.tolerance:.1e}; {dtype_name(self.stored)} round-off floor {self.floor:.1e}")


def same_function(model: torch.nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                  inputs, *, tol: float = TOLERANCE, seed: int = 0, upcast: bool = True) -> Verdict:
    """Whether ``model`` computes the same outputs on ``inputs`` with ``state_a`` as with ``state_b``.

    Runs copies of ``model`` (its current mode; dropout off, random generator seeded); ``model``,
    the states and the inputs are not modified. With ``upcast`` (the default), bfloat16, float16
    and float32 weights are compared on float32 copies at ``tol``, then on float64 copies where
    float32 exceeds it (passing at ``TOLERANCE_FLOAT64``, or at ``tol``: some models compute parts
    in float32 whatever their dtype); float64 weights run in float64. Without ``upcast``, or where
    a low-precision model fails on wider copies, the model runs in its own dtype and the tolerance
    is the larger of ``tol`` and ``FLOOR_FACTOR`` round-off floors.

    Raises:
        ValueError: the model fails on ``inputs`` (their shapes are named), or its outputs hold NaN.

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).bfloat16()
    >>> x = torch.randn(3, 4)
    >>> spec = autoperm.infer_spec(mlp, x.bfloat16())
    >>> b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, 1), mlp.state_dict())
    >>> v = same_function(mlp, mlp.state_dict(), b, x)
    >>> v.ok, v.dtype, v.stored, v.change < 1e-6 < v.floor
    (True, torch.float32, torch.bfloat16, True)
    """
    args = as_tuple(inputs)
    stored = coarsest_dtype([*state_a.values(), *state_b.values()], default=floating_dtype(model))
    if upcast:
        wide = torch.float64 if stored == torch.float64 else torch.float32
        try:
            change, floor = _measure(model, state_a, state_b, args, wide, stored, seed)
        except ValueError:
            if torch.finfo(stored).bits >= 32:
                raise
        else:
            if change <= tol or wide == torch.float64:
                return Verdict(change <= tol, change, tol, wide, stored, floor)
            c64, _ = _measure(model, state_a, state_b, args, torch.float64, stored, seed, with_floor=False)
            bound = TOLERANCE_FLOAT64 if c64 <= TOLERANCE_FLOAT64 else tol
            return Verdict(c64 <= bound, c64, bound, torch.float64, stored, floor, float32_change=change)
    own = floating_dtype(model)
    change, floor = _measure(model, state_a, state_b, args, own, stored, seed)
    bound = max(tol, FLOOR_FACTOR * floor)
    return Verdict(change <= bound, change, bound, own, stored, floor)


def invariance_verdict(model: torch.nn.Module, spec: PermutationSpec, inputs, seed: int = 0,
                       tol: float = TOLERANCE) -> Verdict:
    """:func:`same_function` of ``model`` and a random permutation of every group of ``spec``.

    The decision behind :func:`autoperm.check_invariance`'s number (``autoperm inspect --check``).

    Raises:
        ValueError: as :func:`autoperm.check_invariance` (NaN or inf weights, NaN outputs,
            inputs the model fails on).

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).half()
    >>> x = torch.randn(3, 4)
    >>> print(invariance_verdict(mlp, autoperm.infer_spec(mlp, x.half()), x))  # doctest: +ELLIPSIS
    relative output change ... in float32 copies of the float16 weights <= tolerance 1.0e-04; float16 round-off floor ...
    """
    validate_finite(model)
    state = model.state_dict()
    permuted = apply_permutation(spec, random_permutation(spec, seed), state)
    return same_function(model, state, permuted, inputs, tol=tol, seed=seed)


@torch.no_grad()
def roundoff_perturb_(model: torch.nn.Module, eps: float | None = None,
                      generator: torch.Generator | None = None) -> torch.nn.Module:
    """Multiply every floating-point parameter and buffer by ``1 + eps * u`` (``u`` uniform in [-1, 1]) in place.

    ``eps`` defaults to each tensor's own machine epsilon: every weight moves by up to one
    rounding unit. Returns ``model``.
    """
    for t in model.state_dict().values():
        if t.is_floating_point():
            u = 2 * torch.rand(t.shape, generator=generator, dtype=torch.float64) - 1
            t.mul_((1 + (eps if eps is not None else torch.finfo(t.dtype).eps) * u).to(t.dtype))
    return model


def _measure(model, state_a, state_b, args, dtype, stored, seed, with_floor=True):
    """``(change, floor)`` on one copy of ``model`` in ``dtype`` loaded with each state in turn."""
    work = model_in(model, dtype) if dtype != floating_dtype(model) else copy.deepcopy(model)
    x = inputs_in(args, dtype)
    load_state_(work, _cast(state_a, dtype))
    ya = run_outputs(work, x, seed)
    load_state_(work, _cast(state_b, dtype))
    yb = run_outputs(work, x, seed, check_nan=False)
    change = relative_difference(ya, yb)
    if not with_floor:
        return change, None
    roundoff_perturb_(work, torch.finfo(stored).eps, torch.Generator().manual_seed(seed))
    return change, relative_difference(yb, run_outputs(work, x, seed, check_nan=False))


def _cast(state, dtype):
    return keep_metadata({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, state)
