"""Metrics along the straight line between two models: ``interpolation_curve`` and ``Curve``."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .._load import load_state_
from ..distributed import reduce_sum
from ._state import interpolate_states
from .metrics import BARRIER_KINDS, barrier_height, default_lambdas
from .norm import Repair, as_reiterable, reset_bn_stats

__all__ = ["Curve", "interpolation_curve", "evaluator"]


@dataclass(frozen=True)
class Curve:
    """Metrics of the interpolated models ``(1−λ)·θ_A + λ·θ_B`` at each ``λ`` in ``lambdas``.

    ``metrics`` maps a name (``"loss"``, ``"acc"``, or ``"train_loss"``, ``"test_acc"``, ...) to an
    array of one value per λ. An error curve is derived from each accuracy curve: ``curve["error"]``
    is ``1 − curve["acc"]`` and ``curve["test_error"]`` is ``1 − curve["test_acc"]``.

    >>> c = Curve(np.array([0.0, 0.5, 1.0]), {"loss": np.array([0.1, 0.9, 0.3]), "acc": np.array([0.9, 0.5, 0.8])})
    >>> round(c.barrier("loss"), 3), round(c.barrier("error", "midpoint"), 3)
    (0.7, 0.35)
    """

    lambdas: np.ndarray
    metrics: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.metrics:
            return self.metrics[name]
        if name.endswith("error") and name[:-5] + "acc" in self.metrics:
            return 1.0 - self.metrics[name[:-5] + "acc"]
        raise KeyError(f"no metric {name!r}; the curve has {self.names}")

    @property
    def names(self) -> list[str]:
        """Stored metric names plus the derived error names."""
        return [*self.metrics, *(n[:-3] + "error" for n in self.metrics if n.endswith("acc"))]

    @property
    def loss(self) -> np.ndarray:
        return self["loss"]

    @property
    def acc(self) -> np.ndarray:
        return self["acc"]

    @property
    def error(self) -> np.ndarray:
        return self["error"]

    def at(self, name: str, lam: float) -> float:
        """The value of ``name`` at the grid point ``lam`` (KeyError if ``lam`` is not on the grid)."""
        hit = np.flatnonzero(np.isclose(self.lambdas, lam, rtol=0, atol=1e-9))
        if len(hit) == 0:
            raise KeyError(f"λ = {lam} is not on the grid")
        return float(self[name][hit[0]])

    def barrier(self, metric: str = "loss", kind: str = "max_mean") -> float:
        """The barrier of ``metric`` (a loss, or an ``*error``) by definition ``kind``; see ``metrics``."""
        return barrier_height(self[metric], self.lambdas, kind)

    def barriers(self, metrics: Sequence[str] | None = None, kinds: Sequence[str] = BARRIER_KINDS) -> dict:
        """``{(metric, kind): barrier}`` for every loss and error metric (or ``metrics``) and kind."""
        if metrics is None:
            metrics = [n for n in self.names if n.endswith("loss") or n.endswith("error")]
        has_mid = bool(np.isclose(self.lambdas, 0.5, rtol=0, atol=1e-9).any())
        return {(m, k): self.barrier(m, k) for m in metrics for k in kinds if has_mid or k != "midpoint"}

    def to_dict(self) -> dict:
        """JSON-ready: ``{"lambdas": [...], "metrics": {name: [...]}}``."""
        return {"lambdas": self.lambdas.tolist(), "metrics": {k: np.asarray(v).tolist() for k, v in self.metrics.items()}}


def _as_metrics(result) -> dict:
    """An evaluate() result as ``{name: float}``: a dict, a ``(loss, acc)`` pair, or a loss."""
    if isinstance(result, Mapping):
        return {k: float(v) for k, v in result.items()}
    if isinstance(result, (tuple, list)):
        if len(result) != 2:
            raise ValueError(f"evaluate returned {len(result)} values; return (loss, acc) or a dict")
        return {"loss": float(result[0]), "acc": float(result[1])}
    return {"loss": float(result)}


def interpolation_curve(model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                        evaluate: Callable[[nn.Module], object], lambdas: Sequence[float] | None = None, *,
                        reset_bn: Iterable | None = None, repair: Iterable | Repair | None = None,
                        keys: Collection[str] | None = None, process_group=None) -> Curve:
    """Evaluate the models ``(1−λ)·state_a + λ·state_b`` along a grid of ``λ``.

    ``state_b`` should already be aligned to ``state_a`` (``apply_permutation(spec, perm,
    state_b)``); pass it unaligned for the naive baseline. Neither state, nor ``model``, is
    modified: a copy of ``model`` receives each interpolated state.

    Args:
        model: a model of the architecture (its own weights are not used).
        state_a, state_b: endpoint state dicts with the same keys; integer buffers come from A.
        evaluate: called with the interpolated model (eval mode is up to it), returns a dict of
            floats (e.g. ``{"train_loss": ..., "test_acc": ...}``), a ``(loss, acc)`` pair, or a
            loss. :func:`evaluator` builds one for classification data.
        lambdas: the grid, increasing from 0 to 1; default 25 evenly spaced points.
        reset_bn: batches on which to recompute BatchNorm statistics at every λ (the endpoints
            included) before evaluating; see :func:`reset_bn_stats`.
        repair: batches (or a prepared :class:`Repair`) to REPAIR every interpolated model with;
            applied after ``reset_bn``.
        keys: interpolate only these keys and hold the rest at A (layer-wise barriers).
        process_group: a ``torch.distributed`` process group; each rank passes its own shard of the
            ``reset_bn`` and ``repair`` batches, whose statistics are summed over the ranks, and
            an ``evaluate`` that returns the metrics of all ranks' data (``evaluator(..., process_group=...)`` on
            each rank's shard does). Every rank returns the same curve.

    Returns:
        a :class:`Curve` with one array per metric.

    >>> net = nn.Linear(2, 1)
    >>> a = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    >>> b = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    >>> c = interpolation_curve(net, a, b, lambda m: float(m.weight.sum()), lambdas=[0, 0.5, 1])
    >>> c.loss.tolist()
    [0.0, 1.0, 2.0]
    """
    lam = default_lambdas() if lambdas is None else np.asarray(lambdas, dtype=np.float64)
    work = copy.deepcopy(model)
    if reset_bn is not None:
        reset_bn = as_reiterable(reset_bn)
    if repair is not None and not isinstance(repair, Repair):
        repair = Repair(work, state_a, state_b, repair, process_group=process_group)
    rows: list[dict] = []
    for t in lam:
        load_state_(work, interpolate_states(state_a, state_b, float(t), keys))
        if reset_bn is not None:
            reset_bn_stats(work, reset_bn, process_group=process_group)
        if repair is not None:
            repair(work, float(t))
        with torch.no_grad():
            rows.append(_as_metrics(evaluate(work)))
    names = list(rows[0])
    if any(list(r) != names for r in rows):
        raise ValueError("evaluate returned different metric names at different λ")
    return Curve(lam, {n: np.array([r[n] for r in rows]) for n in names})


def evaluator(data, loss_fn: Callable = nn.functional.cross_entropy, batch_size: int = 1000, process_group=None) -> Callable:
    """An ``evaluate`` for classifiers: mean loss and accuracy on one or several splits.

    Args:
        data: an ``(x, y)`` pair, giving metrics ``"loss"`` and ``"acc"``; or a mapping of split
            name to ``(x, y)`` (e.g. ``{"train": ..., "test": ...}``), giving ``"train_loss"``,
            ``"train_acc"``, ``"test_loss"``, ...; or an ``autoperm.data.Dataset`` (train and test).
        loss_fn: ``loss_fn(logits, y)``, a mean over the batch (default cross-entropy).
        batch_size: evaluation batch size.
        process_group: a ``torch.distributed`` process group; each rank passes its own shard of the data,
            loss sums, hits and counts are summed over the ranks, and every rank gets the metrics
            of the whole data.

    The returned function puts the model in eval mode, runs without gradients, and restores the
    model's mode.
    """
    if hasattr(data, "x_train"):
        splits = {"train": (data.x_train, data.y_train), "test": (data.x_test, data.y_test)}
    elif isinstance(data, Mapping):
        splits = dict(data)
    else:
        splits = {"": tuple(data)}

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict:
        was = model.training
        model.eval()
        out = {}
        try:
            for name, (x, y) in splits.items():
                tot_loss, correct = 0.0, 0
                for i in range(0, len(x), batch_size):
                    xb, yb = x[i:i + batch_size], y[i:i + batch_size]
                    logits = model(xb)
                    tot_loss += float(loss_fn(logits, yb)) * len(xb)
                    correct += int((logits.argmax(-1) == yb).sum())
                tot_loss, correct, count = reduce_sum([tot_loss, correct, len(x)], process_group)
                prefix = f"{name}_" if name else ""
                out[prefix + "loss"] = tot_loss / count
                out[prefix + "acc"] = correct / count
        finally:
            model.train(was)
        return out

    return evaluate
