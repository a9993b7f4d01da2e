"""Weight matching: permutation coordinate descent on ``Σ <A, P(B)>`` (Git Re-Basin, Algorithm 1)."""
from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from tqdm.auto import tqdm

from ..permutation import Permutation, validate_permutation
from ..spec import PermutationSpec
from ._costs import Layout, build_layout, check_states, gather_a, gather_b, objective
from ._lap import solve

__all__ = ["weight_matching"]


@torch.no_grad()
def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0, init: Permutation | None = None, restarts: int = 1,
                    progress: bool | None = None) -> Permutation:
    """The permutation of ``state_b``'s groups that best aligns it to ``state_a``, using no data.

    Maximises ``Σ <A, P(B)>`` over every tensor the spec permutes by coordinate descent: visit
    the groups in a random order, solve one linear assignment per group with every other group
    fixed, and stop when a sweep changes nothing. Groups inside concatenated or fused tensors,
    products, and groups on two axes of one tensor all go through one cost construction
    (``autoperm.matching._costs``). A group that forms a product with a larger one (heads × head
    dim, within-block × blocks of a grouped conv or GroupNorm) is solved together with it: for
    every pair of blocks the best within-block assignment is found, the blocks are assigned on
    those values, and the within-block permutation is solved on the chosen block pairs; the joint
    move is kept only if it raises the objective, otherwise the group takes its plain step.

    Args:
        spec: the model's spec (``autoperm.infer_spec``).
        state_a, state_b: state dicts of two models with that spec; not modified. Tensors may live
            on any device; the work stays there (only the ``n × n`` cost matrices go to the CPU).
        max_iter: at most this many sweeps per restart.
        seed: fixes the visiting orders; the result is deterministic for a seed.
        init: the starting permutation (default: the identity).
        restarts: run this many visiting orders and keep the one with the best objective (a
            single order can stall in a poor local optimum).
        progress: show a progress bar (None: only on a terminal, after 2 s).

    Returns:
        ``{group: LongTensor}`` on the CPU; ``apply_permutation(spec, perm, state_b)`` is B aligned to A.

    Raises:
        ValueError: a key of ``spec.axes`` is missing, has the wrong shape, is not floating point
            or is not finite (the message names the key), or ``init`` is not a permutation.

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoperm.infer_spec(mlp, torch.randn(1, 4))
    >>> a = mlp.state_dict()
    >>> b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), a)
    >>> aligned = autoperm.apply_permutation(spec, weight_matching(spec, a, b), b)
    >>> all(torch.equal(aligned[k], a[k]) for k in a)
    True

    Cost per sweep: for every place a group acts, one ``[n, rest] @ [rest, n]`` product (``n``
    the group size, ``rest`` the tensor's other elements) and one ``n × n`` assignment per group;
    a group none of whose neighbours changed since its last solve is not solved again.
    """
    check_states(spec, state_a=state_a, state_b=state_b)
    if init is not None:
        validate_permutation(spec, init)
    if restarts < 1 or max_iter < 0:
        raise ValueError("restarts must be >= 1 and max_iter >= 0")
    permuted = [k for k, ex in spec.axes.items() if any(ex)]
    device = state_a[permuted[0]].device if permuted else torch.device("cpu")
    dtype = torch.float64 if any(state_a[k].dtype == torch.float64 for k in permuted) else torch.float32
    layout = build_layout(spec, device)
    groups = [g for g in spec.group_sizes if layout.units[g]]
    start = {g: (init[g] if init is not None else torch.arange(n)).long().to(device)
             for g, n in spec.group_sizes.items()}

    best, best_obj = None, None
    bar = tqdm(total=restarts * max_iter, desc="weight matching", unit="sweep", leave=False,
               disable=(None if progress is None else not progress), delay=2.0 if progress is None else 0.0)
    for restart in range(restarts):
        perm = _descend(spec, layout, groups, state_a, state_b, dict(start), random.Random(f"{seed}:{restart}"),
                        max_iter, dtype, bar, restart)
        obj = objective(spec, state_a, state_b, perm) if restarts > 1 else 0.0
        if best is None or obj > best_obj:
            best, best_obj = perm, obj
    bar.close()
    return {g: p.cpu() for g, p in best.items()}


def _descend(spec, layout: Layout, groups, state_a, state_b, perm, rng, max_iter, dtype, bar, restart) -> dict:
    """One run of coordinate descent from ``perm``; returns the final permutation."""
    version = dict.fromkeys(spec.group_sizes, 0)
    solved_at: dict = {}
    for _ in range(max_iter):
        order = groups[:]
        rng.shuffle(order)
        changed = 0
        for g in order:
            stamp = tuple(version[d] for d in layout.deps[g])
            if solved_at.get(g) == stamp:  # same cost as at its last solve: same answer
                continue
            solved_at[g] = stamp
            moved = _block_step(spec, layout, g, state_a, state_b, perm, dtype) if g in layout.pairs else None
            if moved is None:
                moved = _linear_step(spec, layout, g, state_a, state_b, perm, dtype)
            for h, p in moved.items():
                perm[h] = p
                version[h] += 1
            changed += len(moved)
        bar.update(1)
        bar.set_postfix(restart=restart, changed=changed)
        if not changed:
            break
    return perm


def _better(new: float, old: float) -> bool:
    return new > old + 1e-12 * (abs(new) + abs(old))


def _cost(spec, units, state_a, state_b, perm, dtype, cost=None):
    """``Σ_units A_G B_G^T`` (added to ``cost`` if given)."""
    for u in units:
        a_g, b_g = gather_a(u, state_a[u.key], dtype), gather_b(spec, u, state_b[u.key], perm, dtype)
        cost = a_g @ b_g.T if cost is None else cost.addmm_(a_g, b_g.T)
    return cost


def _linear_step(spec, layout, g, state_a, state_b, perm, dtype) -> dict:
    """The best permutation of ``g`` with the others fixed: ``{g: p}`` if it raises the objective, else ``{}``."""
    cost = _cost(spec, layout.units[g], state_a, state_b, perm, dtype)
    new = solve(cost).to(cost.device)
    rows = torch.arange(len(new), device=cost.device)
    if _better(float(cost[rows, new].double().sum()), float(cost[rows, perm[g]].double().sum())):
        return {g: new}
    return {}


def _block_step(spec, layout, g, state_a, state_b, perm, dtype) -> dict | None:
    """Solve ``g`` with its larger product partners: ``{group: p}`` for the groups it moves, or None if the
    joint move does not raise the objective."""
    unpaired, pairs = layout.pairs[g]
    n = spec.group_sizes[g]
    blocks: dict = {}
    for u in pairs:
        m = spec.group_sizes[u.partner]
        full = _cost(spec, [u], state_a, state_b, perm, dtype).view(n, m, n, m).permute(0, 2, 1, 3)
        blocks[u.partner] = full.clone() if u.partner not in blocks else blocks[u.partner].add_(full)
    value = np.zeros((n, n))
    if unpaired:
        value += _cost(spec, unpaired, state_a, state_b, perm, dtype).double().cpu().numpy()
    blocks = {h: s.double().cpu().numpy() for h, s in blocks.items()}
    for s in blocks.values():
        for i in range(n):
            for j in range(n):
                r, c = linear_sum_assignment(s[i, j], maximize=True)
                value[i, j] += s[i, j, r, c].sum()
    p_g = solve(torch.from_numpy(value))
    moved = {g: p_g}
    for h, s in blocks.items():
        moved[h] = solve(torch.from_numpy(s[np.arange(n), p_g.numpy()].sum(0)))
    device = perm[g].device
    moved = {h: p.to(device) for h, p in moved.items() if not torch.equal(p.to(device), perm[h])}
    if not moved:
        return None
    keys = sorted({u.key for h in moved for u in layout.units[h]})
    old = objective(spec, state_a, state_b, perm, keys)
    new = objective(spec, state_a, state_b, {**perm, **moved}, keys)
    return moved if _better(new, old) else None
