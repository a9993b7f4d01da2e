"""The invariance self-check: permute every group at random and compare outputs."""
from __future__ import annotations

import copy

import torch

from ._trace import as_tuple
from .permutation import apply_permutation, random_permutation
from .spec import PermutationSpec

__all__ = ["check_invariance", "relative_difference"]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def relative_difference(a, b) -> float:
    """Largest ``max|a - b| / max|a|`` over the tensors of two (nested) outputs."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        raise ValueError(f"outputs differ in structure: {len(ta)} vs {len(tb)} tensors")
    worst = 0.0
    for x, y in zip(ta, tb):
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)) if x.numel() else 0.0)
    return worst


@torch.no_grad()
def check_invariance(model: torch.nn.Module, spec: PermutationSpec, example_inputs, seed: int = 0) -> float:
    """The largest relative output difference after a random permutation of every group.

    Runs copies of ``model`` in its current mode (train or eval); ``model`` itself is not modified.
    A sound spec gives float round-off (about 1e-6 in float32).

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> autoperm.check_invariance(mlp, autoperm.infer_spec(mlp, x), x) < 1e-5
    True
    """
    args = as_tuple(example_inputs)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    b.load_state_dict(apply_permutation(spec, random_permutation(spec, seed), a.state_dict()))
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        ya = a(*args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yb = b(*args)
    return relative_difference(ya, yb)
