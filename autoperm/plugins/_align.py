"""The alignment step every front end shares: align state dicts to a reference with one matcher.

The CLI (``autoperm align``), the fusion_bench algorithm and the mergekit pre-pass all call
:func:`align_states`; they differ only in where the models come from and where they go.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch

from .._load import load_state_
from ..permutation import Permutation, apply_permutation, identity_permutation
from ..spec import PermutationSpec

__all__ = ["METHODS", "STE_DEFAULTS", "align_states", "matcher", "cross_entropy_last_axis"]

METHODS = ("weight", "activation", "ste")
STE_DEFAULTS = {"steps": 100, "lr": 1e-3}


def matcher(method: str) -> Callable:
    """The matcher function of ``method`` (``autoperm.weight_matching`` etc.), or a clear error."""
    import autoperm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    fn = getattr(autoperm, f"{method}_matching", None)
    if fn is None:
        raise RuntimeError(f"autoperm.{method}_matching is not available in this version of autoperm")
    return fn


def cross_entropy_last_axis(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with classes on the last axis: classifiers ``(N, C)`` and language models ``(N, T, V)``."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _with_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    m = copy.deepcopy(model)
    load_state_(m, state)
    return m.eval()


def _args(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


@torch.no_grad()
def _pseudo_labels(model_a: torch.nn.Module, inputs: Sequence) -> list:
    """Model A's predicted classes: the targets of the straight-through estimator on unlabelled data."""
    return [model_a(*_args(x)).argmax(-1) for x in inputs]


def align_states(spec: PermutationSpec, states: Sequence[Mapping[str, torch.Tensor]], method: str = "weight", *,
                 model: torch.nn.Module | None = None, inputs: Sequence | None = None,
                 labels: Sequence | None = None, loss_fn: Callable | None = None,
                 **options) -> tuple[list[dict], list[Permutation]]:
    """Align every state dict of ``states`` to the first; returns ``(aligned, permutations)``.

    ``aligned[0]`` is the first state itself (as a dict) and ``permutations[0]`` the identity.

    Args:
        spec: the architecture's spec (``autoperm.infer_spec``).
        states: state dicts of that architecture; not modified.
        method: ``"weight"`` needs only the states; ``"activation"`` and ``"ste"`` also need
            ``model`` (the architecture; each state is loaded into a copy) and ``inputs``.
        inputs: batches of model inputs: each a tensor, or a tuple of tensors for a model with
            several inputs.
        labels: one target tensor per batch, for ``"ste"``; without them the targets are model
            A's own predicted classes.
        loss_fn: for ``"ste"``, ``loss_fn(output, target)``; default cross-entropy over the last
            axis (classifiers and language models alike).
        options: passed to the matcher (``seed``, ``max_iter``, ``restarts``; ``steps`` and ``lr``
            for ``"ste"``, default ``STE_DEFAULTS``).
    """
    if not states:
        raise ValueError("nothing to align")
    fn = matcher(method)
    if method != "weight" and (model is None or inputs is None):
        raise ValueError(f"{method} matching needs a model and data batches")
    ref = dict(states[0])
    model_a = _with_state(model, ref) if method != "weight" else None
    if method == "activation":
        batches = [(x,) for x in inputs]  # matchers read a tuple's first element as the input
    elif method == "ste":
        targets = list(labels) if labels is not None else _pseudo_labels(model_a, inputs)
        batches = list(zip(inputs, targets, strict=True))
        options = {**STE_DEFAULTS, **options}
    aligned, perms = [ref], [identity_permutation(spec)]
    for state in states[1:]:
        if method == "weight":
            perm = fn(spec, ref, state, **options)
        elif method == "activation":
            perm = fn(spec, model_a, _with_state(model, state), batches, **options)
        else:
            perm = fn(spec, model_a, _with_state(model, state), batches, loss_fn or cross_entropy_last_axis, **options)
        perms.append(perm)
        aligned.append(apply_permutation(spec, perm, state))
    return aligned, perms
