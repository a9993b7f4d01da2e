"""Linear assignment: the one solver every matcher calls.

Uses the ``lap`` package (Jonker-Volgenant, LAPJV) when it is installed, on row-reduced costs (each
row's maximum minus the row: every row holds a zero, no cost is negative; the same optimum). On the
cost matrices weight matching meets, plain LAPJV was 6× slower than scipy on one ConvNeXt-T matrix;
row-reduced it is faster than scipy on every model measured (``benchmarks/bench_lap.py``,
``docs/performance.md``). Both are exact; scipy's ``linear_sum_assignment`` is the fallback.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

try:
    import lap as _lap
except ImportError:  # pragma: no cover - depends on the environment
    _lap = None

__all__ = ["solve", "solve_numpy"]


def solve_numpy(cost: np.ndarray) -> np.ndarray:
    """The permutation ``p`` maximising ``Σ_i cost[i, p[i]]`` of a square float64 array (int64 array)."""
    if _lap is not None and len(cost) > 1:
        _, x, _ = _lap.lapjv(cost.max(axis=1, keepdims=True) - cost, extend_cost=False)
        return x.astype(np.int64)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return out


def solve(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``Σ_i cost[i, p[i]]`` (a CPU LongTensor).

    >>> solve(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [1, 0]
    """
    return torch.from_numpy(solve_numpy(np.ascontiguousarray(cost.detach().to("cpu", torch.float64).numpy())))
