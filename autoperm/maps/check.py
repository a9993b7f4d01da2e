"""Check a spec's continuous symmetries the way ``check_invariance`` checks its permutations: at random."""
from __future__ import annotations

import copy
from typing import Sequence

import torch

from .._load import load_state_
from .._trace import as_tuple
from ..check import relative_difference, run_outputs, validate_finite
from ..permutation import apply_permutation, random_permutation
from ..spec import PermutationSpec
from .element import apply_transform, random_transform

__all__ = ["check_symmetries"]


@torch.no_grad()
def check_symmetries(model: torch.nn.Module, spec: PermutationSpec, example_inputs, seed: int = 0, *,
                     kinds: Sequence[str] | None = None, permute: bool = True,
                     dtype: torch.dtype | None = None) -> float:
    """The largest relative output difference after a random element of every map (of ``kinds``, if given),
    after a random permutation of every group (unless ``permute=False``).

    Runs copies of ``model``; ``model`` is not modified. ``dtype`` runs both copies in that dtype (float64
    where float32 round-off alone would exceed the tolerance); low-precision models run in float32 by default.

    >>> import torch
    >>> from autoperm.maps import Map, Site
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    >>> m = Map("h", "invertible", 8, sites=(Site("0.weight", 0, "primal"), Site("0.bias", 0, "primal"),
    ...                                       Site("1.weight", 1, "dual")))
    >>> spec = PermutationSpec.from_axes({}, {}, maps=[m])
    >>> check_symmetries(mlp, spec, torch.randn(3, 4), permute=False, dtype=torch.float64) < 1e-10
    True
    """
    from .._float64 import floating_dtype

    args = as_tuple(example_inputs)
    validate_finite(model)
    if dtype is None and torch.finfo(floating_dtype(model)).bits < 32:
        dtype = torch.float32
    a = copy.deepcopy(model)
    if dtype is not None:
        a = a.to(dtype)
        args = tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    b = copy.deepcopy(a)
    sd = a.state_dict()
    if permute and spec.group_sizes:
        sd = apply_permutation(spec, random_permutation(spec, seed), sd)
    load_state_(b, apply_transform(spec, random_transform(spec, seed, kinds), sd))
    return relative_difference(run_outputs(a, args, seed), run_outputs(b, args, seed, check_nan=False))
