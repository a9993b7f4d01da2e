"""Markdown tables of curves and barriers, for terminals and docs."""
from __future__ import annotations

from typing import Mapping, Sequence

from .curve import Curve
from .metrics import BARRIER_KINDS

__all__ = ["markdown_table", "barrier_table", "endpoint_table"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; floats get 3 decimals.

    >>> print(markdown_table(["a", "b"], [["x", 0.12345]]))
    | a | b |
    |---|---|
    | x | 0.123 |
    """
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def barrier_table(curves: Mapping[str, Curve], metrics: Sequence[str] | None = None,
                  kinds: Sequence[str] = BARRIER_KINDS) -> str:
    """Rows: one per curve label; columns: the barrier of each metric by each definition.

    Default metrics: every loss and error of the first curve. Errors are fractions (0.01 = 1 point).
    """
    first = next(iter(curves.values()))
    if metrics is None:
        metrics = [n for n in first.names if n.endswith("loss") or n.endswith("error")]
    header = ["", *(f"{m} {k}" for m in metrics for k in kinds)]
    rows = [[label, *(c.barrier(m, k) for m in metrics for k in kinds)] for label, c in curves.items()]
    return markdown_table(header, rows)


def endpoint_table(curves: Mapping[str, Curve], metrics: Sequence[str] | None = None) -> str:
    """Rows: one per curve label; columns: each metric at λ = 0, ½ and 1, and the mean of the ends."""
    first = next(iter(curves.values()))
    metrics = list(first.metrics) if metrics is None else list(metrics)
    header = ["", *(f"{m} {w}" for m in metrics for w in ("A", "mid", "B", "mean(A,B)"))]
    rows = []
    for label, c in curves.items():
        row = [label]
        for m in metrics:
            f = c[m]
            row += [float(f[0]), c.at(m, 0.5), float(f[-1]), float(0.5 * (f[0] + f[-1]))]
        rows.append(row)
    return markdown_table(header, rows)
