"""The alignment step every front end shares: align state dicts to a reference with one matcher.

The CLI (``autoperm align``), the fusion_bench algorithm and the mergekit pre-pass all call
:func:`align_states`; they differ only in where the models come from and where they go.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..permutation import Permutation, apply_permutation
from ..spec import PermutationSpec

__all__ = ["METHODS", "align_states", "matcher"]

METHODS = ("weight", "activation", "ste")


def matcher(method: str) -> Callable:
    """The matcher function of ``method`` (``autoperm.weight_matching`` etc.), or a clear error."""
    import autoperm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fn = getattr(autoperm, f"{method}_matching", None)
    if fn is None:
        raise RuntimeError(f"autoperm.{method}_matching is not available in this version of autoperm")
    return fn


def _with_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(state, strict=True)
    return m.eval()


def align_states(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], method: str = "weight", *,
                 model: torch.nn.Module | None = None, batches: Iterable | None = None,
                 loss_fn: Callable | None = None, **options) -> tuple[list[dict], list[Permutation]]:
    """Align every state dict of ``states`` to the first; returns ``(aligned, permutations)``.

    ``aligned[0]`` is the first state itself (as a dict) and ``permutations[0]`` the identity.
    ``method="weight"`` needs only the states; ``"activation"`` and ``"ste"`` also need ``model``
    (the architecture; each state is loaded into a copy) and ``batches`` (a list of inputs, or of
    ``(x, y)`` pairs for ``"ste"``). ``options`` go to the matcher (e.g. ``seed``, ``max_iter``).
    """
    if not states:
        raise ValueError("nothing to align")
    fn = matcher(method)
    if method != "weight" and (model is None or batches is None):
        raise ValueError(f"{method} matching needs a model and data batches")
    if batches is not None and not isinstance(batches, (list, tuple)):
        batches = list(batches)  # every pair reads the data again
    ref = dict(states[0])
    model_a = _with_state(model, ref) if method != "weight" else None
    aligned, perms = [ref], [{n: torch.arange(s) for n, s in spec.group_sizes.items()}]
    for state in states[1:]:
        if method == "weight":
            perm = fn(spec, ref, state, **options)
        elif method == "activation":
            perm = fn(spec, model_a, _with_state(model, state), batches, **options)
        else:
            perm = fn(spec, model_a, _with_state(model, state), batches, loss_fn or torch.nn.functional.cross_entropy,
                      **options)
        perms.append(perm)
        aligned.append(apply_permutation(spec, perm, state))
    return aligned, perms
