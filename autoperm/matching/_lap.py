"""Linear assignment: the one solver every matcher calls."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["solve"]


def solve(cost: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``Σ_i cost[i, p[i]]`` (a CPU LongTensor).

    >>> solve(torch.tensor([[0.0, 1.0], [1.0, 0.0]])).tolist()
    [1, 0]
    """
    c = cost.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    out = np.empty(len(rows), dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)
