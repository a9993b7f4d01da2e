"""Linear mode connectivity: interpolation curves, barriers, statistics repair, merging.

The straight line between two models, before and after alignment, is the measurement that
shows what alignment buys. This package evaluates it and reports it by every barrier
definition in use.

>>> import torch, autoperm
>>> from autoperm.barrier import interpolation_curve, evaluator
>>> torch.manual_seed(0) and None
>>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
>>> a = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> b = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
>>> curve = interpolation_curve(a, a.state_dict(), b.state_dict(), evaluator((x, y)))
>>> len(curve.lambdas), sorted(curve.metrics)
(25, ['acc', 'loss'])
>>> sorted(curve.barriers())[:3]
[('error', 'max_linear'), ('error', 'max_mean'), ('error', 'midpoint')]

Pieces:

- ``interpolate_states``, ``average_states``: state-dict arithmetic (integer buffers untouched);
- ``interpolation_curve`` → ``Curve``; ``evaluator`` builds an ``evaluate`` for classifiers;
- ``barrier_height`` and ``Curve.barrier``: ``"max_mean"``, ``"max_linear"``, ``"midpoint"``
  on any loss or error; ``relative_reduction``;
- ``reset_bn_stats`` and ``Repair`` (REPAIR) for interpolated models;
- ``layerwise_curves`` / ``layerwise_barriers``: one layer moves, the rest stay at A;
- ``merge_models``: align N models (to a reference, or MergeMany) and average;
- ``plot`` (``plot_curves``, ``plot_layerwise``) and ``report`` (markdown tables).
"""
from ._state import average_states, interpolate_states
from .curve import Curve, evaluator, interpolation_curve
from .layerwise import layer_groups, layerwise_barriers, layerwise_curves
from .merge import MergeResult, merge_models
from .metrics import BARRIER_KINDS, barrier_height, default_lambdas, relative_reduction
from .norm import Repair, has_batchnorm, repair_points, reset_bn_stats
from .report import barrier_table, endpoint_table, markdown_table

__all__ = [
    "interpolate_states", "average_states",
    "Curve", "interpolation_curve", "evaluator",
    "BARRIER_KINDS", "barrier_height", "relative_reduction", "default_lambdas",
    "reset_bn_stats", "has_batchnorm", "Repair", "repair_points",
    "layer_groups", "layerwise_curves", "layerwise_barriers",
    "merge_models", "MergeResult",
    "barrier_table", "endpoint_table", "markdown_table",
]
