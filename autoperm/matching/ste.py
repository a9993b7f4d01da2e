"""Straight-through estimator matching (Git Re-Basin, section 3.3): learn the permutation through the loss."""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..barrier.norm import _input as batch_input, as_reiterable
from ..permutation import Permutation, apply_permutation
from ..spec import PermutationSpec
from ..distributed import all_reduce_, broadcast_permutation, check_same, world_size
from ._costs import check_states
from .weight import weight_matching

__all__ = ["ste_matching"]


def ste_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches: Iterable,
                 loss_fn: Callable, *, steps: int, lr: float, seed: int = 0, progress: bool | None = None,
                 process_group=None) -> Permutation:
    """The permutation of ``model_b`` whose midpoint with ``model_a`` has a low loss on ``batches``.

    A free copy W̃ of the weights (initialised at A's, as in the reference code, so the first
    projection is plain weight matching) is trained with Adam. At every step W̃ is projected onto
    the permutations of B by weight matching, ``P = weight_matching(spec, W̃, B)``; the loss is
    taken at the midpoint ``½(A + P(B))`` and its gradient passes straight through the
    projection to W̃ (the forward uses ``P(B) + W̃ − stopgrad(W̃)``). The model is evaluated with
    ``torch.func.functional_call`` on ``model_a``'s architecture, in ``model_a``'s current mode.
    Buffers (BatchNorm statistics) and tensors the spec does not permute take their midpoint too,
    without gradient.

    Args:
        spec: the models' spec (``autoperm.infer_spec``).
        model_a, model_b: two models of the architecture; not modified.
        batches: inputs, or tuples ``(x, *targets)``; cycled through for ``steps`` steps.
        loss_fn: ``loss_fn(output, *targets)`` (``loss_fn(output)`` for bare inputs), a scalar tensor,
            e.g. ``torch.nn.functional.cross_entropy`` on ``(x, y)`` batches.
        steps: optimisation steps (one batch each).
        lr: Adam's learning rate.
        seed: the visiting order of every projection.
        progress: show a progress bar (None: only on a terminal, after 2 s).
        process_group: a ``torch.distributed`` process group; each rank passes its own shard of
            the batches and the same models, and every step averages the ranks' gradients (as
            one process would on the step's batches of all ranks together, for a loss that is a
            mean over equal batches); every rank returns the same permutation.

    Returns:
        ``{group: LongTensor}`` on the CPU, the projection of the final W̃;
        ``apply_permutation(spec, perm, model_b.state_dict())`` is B aligned to A.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    state_a = {k: v.detach() for k, v in model_a.state_dict().items()}
    state_b = {k: v.detach() for k, v in model_b.state_dict().items()}
    check_states(spec, state_a=state_a, state_b=state_b)
    check_same(process_group, spec, state_a=state_a, state_b=state_b)
    params = {name for name, _ in model_a.named_parameters()}
    learn = {k: state_a[k].clone().requires_grad_() for k, ex in spec.axes.items() if k in params and any(ex)}
    fixed_mid = {k: (0.5 * (state_a[k] + state_b[k]) if state_a[k].is_floating_point() else state_a[k])
                 for k in state_a if k not in spec.axes}

    def project(perm):
        current = {**state_a, **{k: v.detach() for k, v in learn.items()}}
        return weight_matching(spec, current, state_b, seed=seed, init=perm, progress=False)

    opt = torch.optim.Adam(list(learn.values()), lr=lr)
    perm = None
    source = itertools.cycle(as_reiterable(batches))
    for _ in tqdm(range(steps), desc="STE matching", unit="step", leave=False,
                  disable=(None if progress is None else not progress), delay=2.0 if progress is None else 0.0):
        perm = project(perm)
        with torch.no_grad():
            aligned = apply_permutation(spec, perm, state_b)
        mid = dict(fixed_mid)
        if spec.modules:  # a tensor no group permutes still moves with its module
            mid.update({k: 0.5 * (state_a[k] + aligned[k]) for k in fixed_mid if state_a[k].is_floating_point()})
        for k in spec.axes:
            if k in learn:  # straight through: the value of P(B), the gradient of W̃
                mid[k] = 0.5 * (state_a[k] + aligned[k] + learn[k] - learn[k].detach())
            else:
                mid[k] = 0.5 * (state_a[k] + aligned[k]) if state_a[k].is_floating_point() else state_a[k]
        batch = next(source)
        x = batch_input(batch)
        out = functional_call(model_a, mid, x if isinstance(x, tuple) else (x,))
        targets = tuple(batch[1:]) if isinstance(batch, (tuple, list)) else ()
        loss = loss_fn(out, *targets)
        opt.zero_grad()
        loss.backward()
        if process_group is not None:
            _average_gradients(list(learn.values()), process_group)
        opt.step()
    return broadcast_permutation(project(perm), process_group)


def _average_gradients(params: list, group) -> None:
    """Each parameter's gradient averaged over the ranks (a missing one counts as zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_([p.grad for p in params], group)
    for p in params:
        p.grad /= world_size(group)
