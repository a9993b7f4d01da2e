"""Weight matching: permutation coordinate descent on ``Σ <A, P(B)>`` (Git Re-Basin, Algorithm 1)."""
from __future__ import annotations

import random
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..permutation import Permutation, validate_permutation, with_blocks
from ..spec import PermutationSpec
from ._costs import CostCache, Layout, build_layout, check_states, objective
from ..distributed import broadcast_permutation
from ._lap import solve_numpy
from ._sharded import ShardedCostCache, ShardedState, shard_states

__all__ = ["weight_matching", "descend_groups"]


@torch.no_grad()
def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    *, max_iter: int = 100, seed: int = 0, init: Permutation | None = None, restarts: int = 1,
                    progress: bool | None = None, process_group=None, kinds: Sequence[str] | None = None):
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
    Groups independent per block (``spec.per``) are then refined over the full group: each block
    of A is assigned a block of B on the value of their best inner assignment, and takes that
    assignment as its own inner permutation (``autoperm.matching._blocks``).

    Args:
        spec: the model's spec (``autoperm.infer_spec``).
        state_a, state_b: state dicts of two models with that spec; not modified. Tensors may live
            on any device; the work stays there (only the ``n × n`` cost matrices go to the CPU).
        max_iter: at most this many sweeps per restart.
        seed: fixes the visiting orders; the result is deterministic for a seed.
        init: the starting permutation (default: a greedy seed, each group solved in turn on
            only the tensors whose other groups are already solved; the identity for a group
            never reached).
        restarts: run this many visiting orders and keep the one with the best objective (a
            single order can stall in a poor local optimum).
        progress: show a progress bar (None: only on a terminal, after 2 s).
        process_group: a ``torch.distributed`` process group over which the state dicts are sharded by
            key (each rank passes the keys it holds, of A and the same keys of B; see
            ``autoperm.distributed``). Every cost matrix is summed over the ranks and every rank
            returns the permutation one process finds on the whole state dicts (the block steps of a
            spec with groups per block too: their costs are summed over the ranks as well).
        kinds: continuous symmetry kinds of ``spec.maps`` to match as well (``"orthogonal"``,
            ``"rotary"``, ``"scale"``, ``"invertible"``; see ``autoperm.matching.maps``). None (the
            default): permutations only.

    Returns:
        ``{group: LongTensor}`` on the CPU; ``apply_permutation(spec, perm, state_b)`` is B aligned to A.
        With ``kinds``: an ``autoperm.maps.Alignment`` (permutation and transform);
        ``autoperm.maps.align_state(spec, state_a, state_b, result)`` is B aligned to A.

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
    if process_group is not None:
        state_a, state_b = shard_states(spec, state_a, state_b, process_group)
    else:
        check_states(spec, state_a=state_a, state_b=state_b)
    if init is not None:
        validate_permutation(spec, init)
    if restarts < 1 or max_iter < 0:
        raise ValueError("restarts must be >= 1 and max_iter >= 0")
    if kinds is not None:
        from .maps import check_kinds, match_maps
        kinds = check_kinds(kinds)
        if process_group is not None:
            raise ValueError("weight matching with continuous symmetry kinds does not run over a process group")
        _check_map_keys(spec, kinds, state_a, state_b)
        return match_maps(spec, state_a, state_b, kinds, descend=descend_groups, max_iter=max_iter, seed=seed,
                          init=init, restarts=restarts, progress=progress)
    perm = descend_groups(spec, state_a, state_b, init, None, max_iter=max_iter, seed=seed, restarts=restarts,
                          progress=progress, unknown=None if init is None else ())
    if process_group is None:
        return perm
    return with_blocks(broadcast_permutation(perm, process_group), spec)



def _check_map_keys(spec, kinds, state_a, state_b) -> None:
    """ValueError naming the key unless both states hold every tensor a matched map touches, same shape."""
    from .maps import used_maps
    for m, _ in used_maps(spec, kinds):
        for key in m.keys:
            for name, st in (("state_a", state_a), ("state_b", state_b)):
                if key not in st:
                    raise ValueError(f"{name} has no key {key!r} that map {m.name!r} acts on")
                if not st[key].is_floating_point() or not bool(torch.isfinite(st[key]).all()):
                    raise ValueError(f"{name}[{key!r}] (map {m.name!r}) must be floating point and finite")
            if state_a[key].shape != state_b[key].shape:
                raise ValueError(f"{key!r} has shape {tuple(state_a[key].shape)} in state_a, "
                                 f"{tuple(state_b[key].shape)} in state_b")


def descend_groups(spec, state_a, state_b, init, only, *, max_iter=100, seed=0, restarts=1, progress=None,
                   stats: dict | None = None, unknown=None) -> Permutation:
    """Coordinate descent over the groups in ``only`` (None: all), the others held at ``init``.

    ``unknown`` (None: the groups in ``only``) are the groups whose ``init`` is only a placeholder:
    they are first seeded by :func:`_seed`. Inputs are not checked here (``weight_matching`` does
    it). ``stats``, if given, receives ``sweeps`` (per restart) and ``solves`` (cost matrices built
    and assigned). A spec with groups per block runs over the full group (``_blocks.descend_blocks``), one
    with module groups adds module steps (``_modules.descend_modules``)."""
    if spec.modules:
        from ._modules import descend_modules
        return descend_modules(spec, state_a, state_b, init, only, descend_groups, max_iter=max_iter, seed=seed,
                               restarts=restarts, progress=progress, stats=stats, unknown=unknown)
    if spec.per:
        from ._blocks import descend_blocks
        return descend_blocks(spec, state_a, state_b, init, only, descend_groups, max_iter=max_iter, seed=seed,
                              restarts=restarts, progress=progress, stats=stats, unknown=unknown)
    permuted = [k for k, ex in spec.axes.items() if any(ex)]
    device = state_a[permuted[0]].device if permuted else torch.device("cpu")
    dtype = torch.float64 if any(state_a[k].dtype == torch.float64 for k in permuted) else torch.float32
    layout = build_layout(spec, device)
    groups = [g for g in spec.group_sizes if layout.units[g] and (only is None or g in only)]
    if only is not None:  # a block step moves its partners too: only where they may move
        layout.pairs = {g: p for g, p in layout.pairs.items() if all(u.partner in only for u in p[1])}
    budget = 0.5 * sum(s[k].numel() * s[k].element_size() for s in (state_a, state_b) for k in permuted)
    start = {g: (init[g] if init is not None else torch.arange(n)).long().to(device)
             for g, n in spec.group_sizes.items()}
    unknown = set(groups if unknown is None else unknown) & set(groups)

    best, best_obj = None, None
    bar = tqdm(total=restarts * max_iter, desc="weight matching", unit="sweep", leave=False,
               disable=(None if progress is None else not progress), delay=2.0 if progress is None else 0.0)
    for restart in range(restarts):
        cache = ShardedCostCache if isinstance(state_a, ShardedState) else CostCache
        costs = cache(spec, state_a, state_b, dtype, _kept(spec, layout, state_a, dtype, budget))
        rng = random.Random(f"{seed}:{restart}")
        perm, solved = _seed(spec, layout, unknown, costs, dict(start), rng)
        perm = _descend(spec, layout, groups, costs, perm, rng, max_iter, bar, restart,
                        stats if stats is not None else {}, solved)
        obj = objective(spec, state_a, state_b, perm) if restarts > 1 else 0.0
        if best is None or obj > best_obj:
            best, best_obj = perm, obj
    bar.close()
    return {g: p.cpu() for g, p in best.items()}


def _kept(spec, layout: Layout, state_a, dtype, budget: float) -> list:
    """The cost matrices worth keeping between visits: most product work per byte first, within ``budget``."""
    size = torch.empty((), dtype=dtype).element_size()
    cands = []
    for g, units in layout.units.items():
        sets = [(("units", g), units)]
        if g in layout.pairs:
            unpaired, pairs = layout.pairs[g]
            sets.append((("unpaired", g), unpaired))
            sets += [(("pair", g, h), [u for u in pairs if u.partner == h]) for h in dict.fromkeys(u.partner for u in pairs)]
        for name, us in sets:
            if us:
                rows = us[0].table[..., 0].numel() if us[0].table is not None else spec.group_sizes[g]
                work = sum(state_a[u.key].numel() for u in us)
                cands.append((work / rows, rows * rows * size, name))
    keep, used = [], 0
    for _, nbytes, name in sorted(cands, key=lambda c: -c[0]):
        if used + nbytes <= budget:
            keep.append(name)
            used += nbytes
    return keep


def _seed(spec, layout: Layout, unknown: set, costs, perm, rng) -> tuple[dict, set]:
    """Starting values for the ``unknown`` groups, from the places whose other groups are known,
    and the groups among them solved exactly as the descent would (all their units, a plain step).

    A cost term through a group still at its placeholder is noise that can outweigh the true
    signal (an identity-initialised weight under a wrong permutation of its other axis pulls the
    solve towards that permutation). So each unknown group is solved, once, on only the units
    that depend on known groups alone, the group with the most such weight first (random order
    among equals); it then counts as known. Groups never reached (say, heads × head dim, which
    only occur together) keep their placeholder; coordinate descent takes it from there."""
    known = set(spec.group_sizes) - unknown
    solved = set()
    pending = sorted(unknown)
    rng.shuffle(pending)
    users: dict = {}
    for h in pending:
        for g in layout.deps[h]:
            users.setdefault(g, []).append(h)
    work = {}

    def weigh(h):
        work[h] = sum(costs.a[u.key].numel() for u in layout.units[h] if u.deps <= known)

    for h in pending:
        weigh(h)
    while pending:
        g = max(pending, key=work.get)
        if not work[g]:
            break
        ready = [u for u in layout.units[g] if u.deps <= known]
        cost = costs.cost(None, ready, perm).detach().to("cpu", torch.float64).numpy()
        perm[g] = torch.from_numpy(solve_numpy(cost)).to(perm[g].device)
        if len(ready) == len(layout.units[g]) and g not in layout.pairs:
            solved.add(g)  # the descent's own step, on the final values of its dependencies
        known.add(g)
        pending.remove(g)
        for h in users.get(g, ()):
            if h not in known:
                weigh(h)
    return perm, solved


def _descend(spec, layout: Layout, groups, costs, perm, rng, max_iter, bar, restart, stats: dict,
             solved=()) -> dict:
    """One run of coordinate descent from ``perm``; returns the final permutation.

    Groups in ``solved`` already hold the best answer to their current cost (the seed pass solved
    them on all their units): they are solved again only once a dependency moves."""
    version = dict.fromkeys(spec.group_sizes, 0)
    solved_at: dict = {g: tuple(0 for _ in layout.deps[g]) for g in solved}
    stats.setdefault("sweeps", []).append(0)
    for _ in range(max_iter):
        stats["sweeps"][-1] += 1
        order = groups[:]
        rng.shuffle(order)
        changed = 0
        for g in order:
            stamp = tuple(version[d] for d in layout.deps[g])
            if solved_at.get(g) == stamp:  # same cost as at its last solve: same answer
                continue
            solved_at[g] = stamp
            stats["solves"] = stats.get("solves", 0) + 1
            moved = _block_step(spec, layout, g, costs, perm) if g in layout.pairs else None
            if moved is None:
                moved = _linear_step(layout, g, costs, perm)
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


def _linear_step(layout, g, costs: CostCache, perm) -> dict:
    """The best permutation of ``g`` with the others fixed: ``{g: p}`` if it raises the objective, else ``{}``."""
    cost = costs.cost(("units", g), layout.units[g], perm).detach().to("cpu", torch.float64).numpy()
    new, rows = solve_numpy(cost), np.arange(len(cost))
    if _better(cost[rows, new].sum(), cost[rows, perm[g].cpu().numpy()].sum()):
        return {g: torch.from_numpy(new).to(perm[g].device)}
    return {}


def _block_step(spec, layout, g, costs: CostCache, perm) -> dict | None:
    """Solve ``g`` with its larger product partners: ``{group: p}`` for the groups it moves, or None if the
    joint move does not raise the objective."""
    unpaired, pairs = layout.pairs[g]
    n = spec.group_sizes[g]
    blocks = {}
    for h in dict.fromkeys(u.partner for u in pairs):
        m = spec.group_sizes[h]
        full = costs.cost(("pair", g, h), [u for u in pairs if u.partner == h], perm)
        blocks[h] = full.view(n, m, n, m).permute(0, 2, 1, 3).double().cpu().numpy()
    value = np.zeros((n, n))
    if unpaired:
        value += costs.cost(("unpaired", g), unpaired, perm).double().cpu().numpy()
    for s in blocks.values():
        inner = np.arange(s.shape[-1])
        for i in range(n):
            for j in range(n):
                value[i, j] += s[i, j, inner, solve_numpy(np.ascontiguousarray(s[i, j]))].sum()
    p_g = solve_numpy(value)
    moved = {g: p_g}
    for h, s in blocks.items():
        moved[h] = solve_numpy(s[np.arange(n), p_g].sum(0))
    device = perm[g].device
    moved = {h: torch.from_numpy(p).to(device) for h, p in moved.items() if not np.array_equal(p, perm[h].cpu().numpy())}
    if not moved:
        return None
    keys = sorted({u.key for h in moved for u in layout.units[h]})
    old = objective(spec, costs.a, costs.b, perm, keys)
    new = objective(spec, costs.a, costs.b, {**perm, **moved}, keys)
    return moved if _better(new, old) else None
