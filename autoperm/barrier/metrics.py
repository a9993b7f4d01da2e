"""Barrier definitions: how far a metric along the interpolation path rises above its endpoints.

Let ``f(λ)`` be a metric (loss, or error = 1 − accuracy) of the model with parameters
``(1−λ)·θ_A + λ·θ_B``. The three definitions in use:

================  ====================================  =============================================
``kind``          value                                 used by
================  ====================================  =============================================
``"max_mean"``    max_λ f(λ) − ½(f(0) + f(1))           Git Re-Basin (its Definition 2.2, after
                                                        Frankle et al. 2020), 25 evenly spaced λ
``"max_linear"``  max_λ [f(λ) − ((1−λ)f(0) + λf(1))]    Entezari et al. 2021
``"midpoint"``    f(½) − ½(f(0) + f(1))                 REPAIR (Jordan et al. 2022)
================  ====================================  =============================================

Sign convention: all three are *curve minus endpoints*, so a positive value is a barrier and a
path that dips below its ends gives a negative ``midpoint`` value. ``max_mean`` and
``max_linear`` are never negative on a grid that contains both ends (the ``max_linear`` term
is 0 at λ = 0; for ``max_mean`` the larger end is at least the mean). For the quadratic
``f(λ) = L(θ_A + λΔ)`` with ``L(θ) = ½ θᵀHθ + gᵀθ + c``, ``midpoint`` is exactly ``−⅛ ΔᵀHΔ``:
negative in a convex basin, positive across a ridge.

The maxima are taken over the λ grid the curve was evaluated on, so they are lower bounds of the
continuous maxima; 25 evenly spaced points (the default) include λ = ½.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["BARRIER_KINDS", "barrier_height", "relative_reduction", "default_lambdas"]

BARRIER_KINDS = ("max_mean", "max_linear", "midpoint")


def default_lambdas(num: int = 25) -> np.ndarray:
    """``num`` evenly spaced λ in [0, 1] (25 by default, as in Git Re-Basin); odd ``num`` includes ½."""
    if num < 2:
        raise ValueError(f"need at least the two endpoints, got num={num}")
    return np.linspace(0.0, 1.0, num)


def _check_lambdas(lambdas: np.ndarray, n: int) -> None:
    if lambdas.ndim != 1 or len(lambdas) != n:
        raise ValueError(f"{n} values but {lambdas.size} lambdas")
    if n < 2 or not np.isclose(lambdas[0], 0.0) or not np.isclose(lambdas[-1], 1.0):
        raise ValueError("lambdas must start at 0 and end at 1 (the two endpoint models)")
    if np.any(np.diff(lambdas) <= 0):
        raise ValueError("lambdas must be strictly increasing")


def barrier_height(values: Sequence[float], lambdas: Sequence[float] | None = None, kind: str = "max_mean") -> float:
    """The barrier of one metric curve by definition ``kind`` (see the module docstring).

    Args:
        values: the metric at each λ (loss, or error; for accuracy pass ``1 - acc``).
        lambdas: the λ grid, increasing from 0 to 1; default: evenly spaced over ``len(values)``.
        kind: ``"max_mean"``, ``"max_linear"`` or ``"midpoint"``.

    Raises:
        ValueError: unknown ``kind``; a grid that does not run from 0 to 1; ``"midpoint"`` on a
            grid without λ = ½ (no value is made up by interpolating the curve).

    >>> barrier_height([1.0, 3.0, 2.0], kind="max_mean")        # 3 - (1 + 2) / 2
    1.5
    >>> barrier_height([1.0, 3.0, 2.0], kind="max_linear")      # 3 - 1.5 at λ = ½
    1.5
    >>> barrier_height([1.0, 0.5, 2.0], kind="midpoint")        # may be negative
    -1.0
    """
    f = np.asarray(values, dtype=np.float64)
    lam = default_lambdas(len(f)) if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    _check_lambdas(lam, len(f))
    mean_ends = 0.5 * (f[0] + f[-1])
    if kind == "max_mean":
        return float(f.max() - mean_ends)
    if kind == "max_linear":
        return float(np.max(f - ((1 - lam) * f[0] + lam * f[-1])))
    if kind == "midpoint":
        mid = np.flatnonzero(np.isclose(lam, 0.5, rtol=0, atol=1e-9))
        if len(mid) == 0:
            raise ValueError("the midpoint barrier needs λ = 0.5 in the grid (use an odd number of evenly spaced points)")
        return float(f[mid[0]] - mean_ends)
    raise ValueError(f"unknown barrier kind {kind!r}; expected one of {BARRIER_KINDS}")


def relative_reduction(method: float, naive: float) -> float:
    """``1 − method / naive``: the share of the naive barrier that a method removed (REPAIR, Git Re-Basin).

    1.0 removes it all; above 1.0 the path now dips below the endpoints; NaN when ``naive`` ≤ 0
    (there was nothing to remove).

    >>> relative_reduction(0.1, 0.5)
    0.8
    """
    if not naive > 0:
        return float("nan")
    return float(1.0 - method / naive)
