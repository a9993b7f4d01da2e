"""PNG plots of interpolation curves and layer-wise barriers (matplotlib, Agg; no display needed).

Figures are built with ``matplotlib.figure.Figure`` directly, so importing this module never
changes the process-wide pyplot backend.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from .curve import Curve

__all__ = ["plot_curves", "plot_layerwise", "plot_series"]

_TITLES = {"loss": "loss", "acc": "accuracy", "error": "error"}


def _figure(ncols: int, nrows: int = 1, size=(4.2, 3.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _title(metric: str) -> str:
    split, _, kind = metric.rpartition("_")
    return f"{split} {_TITLES.get(kind, kind)}".strip()


def plot_curves(curves: Mapping[str, Curve], path: str, metrics: Sequence[str] | None = None,
                title: str | None = None) -> str:
    """One panel per metric, one line per labelled curve (e.g. naive vs each matcher); returns ``path``.

    ``metrics`` default: every metric of the first curve (losses first, then accuracies).
    """
    first = next(iter(curves.values()))
    if metrics is None:
        metrics = sorted(first.metrics, key=lambda m: (not m.endswith("loss"), m))
    fig = _figure(len(metrics))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for label, c in curves.items():
            ax.plot(c.lambdas, c[metric], marker="o", markersize=2.5, linewidth=1.5, label=label)
        ax.set_xlabel("λ  (0 = model A, 1 = model B)")
        ax.set_title(_title(metric))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_layerwise(barriers: Mapping[str, Mapping[str, float]], path: str, ylabel: str = "barrier",
                   title: str | None = None) -> str:
    """Grouped bars: one group per layer, one bar per label (e.g. naive vs weight matching)."""
    labels = list(barriers)
    layers = list(dict.fromkeys(k for b in barriers.values() for k in b))
    fig = _figure(1, size=(max(5.0, 0.55 * len(layers) * max(1, len(labels)) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(layers))
    for j, label in enumerate(labels):
        ax.bar(x + (j - (len(labels) - 1) / 2) * width, [barriers[label].get(k, np.nan) for k in layers],
               width=width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_series(xs: Sequence[float], series: Mapping[str, Sequence[float]], path: str, xlabel: str,
                ylabel: str, title: str | None = None, logx: bool = False, errors: Mapping[str, Sequence[float]] | None = None) -> str:
    """Lines of ``series`` against ``xs`` (e.g. barrier against width), with optional error bars."""
    fig = _figure(1)
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        yerr = None if errors is None else errors.get(label)
        ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)
