"""Merging N models: align them, then average their weights.

Two ways to align (Git Re-Basin, section 4 and its Algorithm 3):

- ``"reference"``: align every model to one reference model, then average;
- ``"mergemany"``: cycle through the models in a random order, align each to the mean of all
  the others, until a full sweep changes nothing. No model is special, and the alignments are
  consistent with each other rather than each with one reference.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..permutation import Permutation, apply_permutation, compose_permutations, identity_permutation
from ..spec import PermutationSpec
from ._state import average_states

__all__ = ["merge_models", "MergeResult"]

Matcher = Callable[[PermutationSpec, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Permutation]


@dataclass(frozen=True)
class MergeResult:
    """The merged state dict; ``permutations[i]`` aligns input ``i`` (``aligned[i]`` is the result)."""

    state: dict
    permutations: list
    aligned: list
    sweeps: int


def _weight_matching(spec, state_a, state_b):
    from .. import weight_matching  # written beside this package; imported when first needed

    return weight_matching(spec, state_a, state_b)


def _is_identity(perm: Permutation) -> bool:
    return all(torch.equal(p.cpu(), torch.arange(p.shape[-1]).expand_as(p)) for p in perm.values())


def merge_models(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], *, method: str = "mergemany",
                 reference: int = 0, match: Matcher | None = None, max_sweeps: int = 20, seed: int = 0) -> MergeResult:
    """Align ``states`` (N state dicts of one architecture) and average them.

    Args:
        spec: the architecture's permutation spec (``autoperm.infer_spec``).
        states: the models' state dicts; not modified.
        method: ``"reference"`` or ``"mergemany"`` (see the module docstring).
        reference: the index of the reference model for ``"reference"``.
        match: ``match(spec, target, state) -> Permutation`` aligning ``state`` to ``target``;
            default ``autoperm.weight_matching``. ``"mergemany"`` matches to an average of
            weights, so it needs a weight-based matcher.
        max_sweeps: ``"mergemany"`` stops after this many sweeps even if not converged.
        seed: fixes ``"mergemany"``'s visiting orders.

    Returns:
        a :class:`MergeResult`; evaluate ``result.state`` after resetting BatchNorm statistics if
        the model has any (averaged running statistics are not the merged model's statistics).
    """
    if len(states) < 2:
        raise ValueError("merging needs at least two models")
    match = match or _weight_matching
    perms = [identity_permutation(spec) for _ in states]
    aligned = [dict(s) for s in states]
    sweeps = 0
    if method == "reference":
        for i, s in enumerate(states):
            if i != reference:
                perms[i] = match(spec, states[reference], s)
                aligned[i] = apply_permutation(spec, perms[i], s)
    elif method == "mergemany":
        rng = random.Random(seed)
        n = len(states)
        while sweeps < max_sweeps:
            sweeps += 1
            changed = False
            for i in rng.sample(range(n), n):
                others = average_states([aligned[j] for j in range(n) if j != i])
                step = match(spec, others, aligned[i])
                if not _is_identity(step):
                    changed = True
                    perms[i] = compose_permutations(perms[i], step)
                    aligned[i] = apply_permutation(spec, perms[i], states[i])
            if not changed:
                break
    else:
        raise ValueError(f"unknown merge method {method!r}; expected 'reference' or 'mergemany'")
    return MergeResult(average_states(aligned), perms, aligned, sweeps)
