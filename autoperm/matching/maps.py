"""Weight matching over permutations and continuous symmetries together (one coordinate descent).

Both states have the norms of the matched maps folded into their readers first (so a map's sites
see every scale that rides on its space). The objective is ``-Σ |A - T(P(B))|²`` over every tensor a
group or a matched map touches; for permutations, orthogonal and rotary maps it is ``2 Σ <A, T(P(B))>``
plus a constant, the weight-matching objective. The descent alternates:

- a *map phase*: each map in spec order takes its closed-form best element with everything else fixed
  (``_map_steps``); a move is kept only if it lowers the distance; sweeps repeat until none moves;
- a *permutation phase*: permutation weight matching (``descend_groups``) of B against ``T*(A)``
  (the adjoint of the current transform applied to A, so ``<T*(A), P(B)> = <A, T(P(B))>``), from
  the current permutation (and, in the first round, also afresh), kept if it lowers the distance;

until a round lowers the distance by less than ``TOL`` of it. Every step is deterministic: the result depends only on
the seed (the permutation phase's visiting orders).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..maps.align import Alignment
from ..maps.element import Transform, apply_transform, fold_norms, identity_transform, maps_of
from ..maps.map import KINDS, Map
from ..permutation import apply_permutation, identity_permutation
from ..spec import PermutationSpec, walk_groups
from ._map_steps import act, gather_sites, matrices_of, scatter_site, site_rows, solve_map

__all__ = ["match_maps", "used_maps", "check_kinds", "refine_maps"]

TOL = 1e-8  # a round (or a sweep of the maps) lowering the distance by less than this fraction of it ends the descent


def check_kinds(kinds) -> tuple:
    """``kinds`` as a tuple of known kinds (ValueError naming an unknown one)."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown symmetry kinds {bad}; choose among {KINDS}")
    return kinds


_SUBGROUPS = {"invertible": ("invertible", "orthogonal", "scale"), "orthogonal": ("orthogonal",),
              "rotary": ("rotary",), "scale": ("scale",)}


def used_maps(spec, kinds: Sequence[str]) -> list[tuple[Map, str]]:
    """``[(map, kind it is matched as)]`` for the maps that some kind of ``kinds`` holds on: the map's own
    kind, a kind it lists in ``holds``, or a subgroup of its kind (an invertible map is matched over its
    orthogonal subgroup when only ``"orthogonal"`` is asked for, over its positive diagonal for
    ``"scale"``); the largest such group is used (invertible, rotary, orthogonal, scale)."""
    out = []
    for m in maps_of(spec):
        allowed = {"orthogonal"} if m.center else set(_SUBGROUPS[m.kind]) | set(getattr(m, "holds", ()) or ())
        for k in ("invertible", "rotary", "orthogonal", "scale"):
            if k in kinds and k in allowed:
                out.append((m, k))
                break
    return out


def _dist(a, b, keys) -> float:
    return sum(float((a[k].to(torch.float64) - b[k].to(torch.float64)).pow(2).sum()) for k in keys)


def _inverse(mats: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in ("orthogonal", "rotary"):
        return mats.transpose(1, 2)
    return torch.linalg.inv(mats)


def _on_sites(m: Map, state: dict, primal: torch.Tensor, dual: torch.Tensor) -> None:
    """``state`` (in place, new tensors) with ``primal[b] @`` every primal site and ``dual[b] @`` every dual one."""
    for s in m.sites:
        rows = site_rows(m, s)
        x = gather_sites(state[s.key], s.axis, rows)
        state[s.key] = scatter_site(state[s.key], s.axis, rows, act(primal if s.role == "primal" else dual, x))


def _step(m: Map, kind: str, a: dict, cur: dict, value: torch.Tensor, sites=None,
          force: bool = False) -> tuple[torch.Tensor, dict] | None:
    """Map ``m``'s best element with the rest of ``cur`` fixed: ``(value, new tensors)`` if it lowers the
    distance to ``a``, else None. ``sites`` (default: all) are the sites whose statistics count."""
    mats = matrices_of(m, value)
    inv = _inverse(mats, kind)
    own_p, own_d = inv, mats.transpose(1, 2)  # X0 = A^-1 X (primal), A^T X (dual)
    stats: dict = {}

    def add(name, v):
        stats[name] = v if name not in stats else stats[name] + v

    for s in m.sites if sites is None else sites:
        rows = site_rows(m, s)
        y = gather_sites(a[s.key], s.axis, rows)
        x0 = act(own_p if s.role == "primal" else own_d, gather_sites(cur[s.key], s.axis, rows))
        if kind in ("orthogonal", "rotary"):
            add("M", y @ x0.transpose(1, 2))
        elif kind == "scale":
            prod, sq = (y * x0).sum(-1), (x0 * x0).sum(-1)
            add("p" if s.role == "primal" else "d", prod)
            add("P" if s.role == "primal" else "D", sq)
            add("d" if s.role == "primal" else "p", torch.zeros_like(prod))
            add("D" if s.role == "primal" else "P", torch.zeros_like(sq))
        else:
            add("C", y @ x0.transpose(1, 2))
            if s.role == "primal":
                add("Spp", x0 @ x0.transpose(1, 2))
            else:
                add("Sdd", y @ y.transpose(1, 2))
    if not stats:
        return None
    if kind == "invertible":
        z = torch.zeros_like(stats["C"])
        stats.setdefault("Spp", z)
        stats.setdefault("Sdd", z)
    new = solve_map(m, kind, {k: v.cpu() for k, v in stats.items()})
    new_mats = matrices_of(m, new)
    if kind == "invertible" and not bool(torch.isfinite(torch.linalg.cond(new_mats)).all()):
        return None
    keys = sorted({s.key for s in m.sites})
    trial = {k: cur[k] for k in keys}
    delta = new_mats @ inv
    _on_sites(m, trial, delta, _inverse(delta, kind).transpose(1, 2))
    before, after = _dist(a, cur, keys), _dist(a, trial, keys)
    if force or after < before - 1e-12 * max(before, 1e-300):
        return new, trial
    return None


def _free_sites(spec, maps, m: Map) -> list:
    """The sites of ``m`` whose tensor has no other axis moved by a group or another matched map: their
    statistics do not depend on anything still unknown."""
    moved = {(s.key, s.axis) for o, _ in maps if o is not m for s in o.sites}
    out = []
    for s in m.sites:
        exprs = spec.axes.get(s.key, [])
        others = [k for k, e in enumerate(exprs) if k != s.axis and e is not None and walk_groups(e)]
        if not others and not any(k == s.key and ax != s.axis for k, ax in moved):
            out.append(s)
    return out


def _seed_maps(spec, maps, a, cur, transform) -> None:
    """Start each map from its step on its free sites only (``_free_sites``), in place."""
    for m, kind in maps:
        free = _free_sites(spec, maps, m)
        if free and len(free) < len(m.sites):
            res = _step(m, kind, a, cur, transform[m.name], free, force=True)
            if res is not None:
                transform[m.name], trial = res
                cur.update(trial)


def _adjoint(maps, transform, a: dict) -> dict:
    """``T*(a)``: every site of every map with ``A_b^T`` (primal) or ``A_b^{-1}`` (dual) applied."""
    out = dict(a)
    for m, kind in maps:
        mats = matrices_of(m, transform[m.name])
        _on_sites(m, out, mats.transpose(1, 2), _inverse(mats, kind))
    return out


def _balanced(maps, state: dict) -> dict:
    """``state`` with every scale map set so each unit's primal and dual weights have equal norms."""
    scales = [(m, k) for m, k in maps if k == "scale"]
    values = Transform()
    for m, _ in scales:
        p = torch.zeros(m.blocks, m.size, dtype=torch.float64)
        d = torch.zeros_like(p)
        for s in m.sites:
            sq = gather_sites(state[s.key], s.axis, site_rows(m, s)).pow(2).sum(-1).cpu()
            if s.role == "primal":
                p += sq
            else:
                d += sq
        ok = (p > 0) & (d > 0)
        values[m.name] = torch.where(ok, (d / p.clamp_min(1e-300)) ** 0.25, torch.ones_like(p))
    return apply_transform([m for m, _ in scales], values, state) if scales else state


def match_maps(spec: PermutationSpec, state_a: Mapping, state_b: Mapping, kinds: Sequence[str], *,
               descend, max_iter: int = 100, seed: int = 0, init=None, restarts: int = 1, progress=None,
               rounds: int = 30, stats: dict | None = None) -> Alignment:
    """The descent described in the module docstring; ``descend`` is permutation weight matching's
    ``descend_groups`` (passed in to keep the modules apart). Inputs are checked by the caller."""
    kinds = check_kinds(kinds)
    maps = used_maps(spec, kinds)
    a = fold_norms([m for m, _ in maps], state_a)
    b = fold_norms([m for m, _ in maps], state_b)
    keys = sorted({k for k, ex in spec.axes.items() if any(ex)} | {s.key for m, _ in maps for s in m.sites})
    has_groups = bool(spec.group_sizes)
    kw = dict(max_iter=max_iter, seed=seed, progress=progress)
    starts = []
    if init is not None or not has_groups:
        starts.append((init if init is not None else identity_permutation(spec), identity_transform([m for m, _ in maps])))
    else:
        # start 1: permutations matched on balanced weights, every map at the identity
        starts.append((descend(spec, _balanced(maps, a), _balanced(maps, b), None, None, restarts=restarts, **kw),
                       identity_transform([m for m, _ in maps])))
        # start 2: every map from its free sites, then permutations matched afresh against it
        t = identity_transform([m for m, _ in maps])
        if any(_free_sites(spec, maps, m) for m, _ in maps):
            _seed_maps(spec, maps, a, dict(b), t)
            starts.append((descend(spec, _adjoint(maps, t, a), b, None, None, restarts=1, **kw), t))
    best = None
    for perm, transform in starts:
        perm, transform, history = _descend(spec, maps, a, b, keys, perm, transform, descend, rounds, kw)
        if best is None or history[-1] > best[2][-1]:
            best = (perm, transform, history)
    perm, transform, history = best
    if stats is not None:
        stats["rounds"] = len(history) - 1
        stats["starts"] = len(starts)
    transform = Transform({k: v.to(torch.float64).cpu() for k, v in transform.items()})
    return Alignment({g: p.cpu() for g, p in perm.items()}, transform, kinds, history)


def _descend(spec, maps, a, b, keys, perm, transform, descend, rounds, kw) -> tuple:
    """The alternating descent from ``(perm, transform)``; returns them improved and the objective per round."""
    has_groups = bool(spec.group_sizes)
    transform = Transform({k: v.clone() for k, v in transform.items()})
    cur = apply_transform([m for m, _ in maps], transform, apply_permutation(spec, perm, b) if has_groups else b)
    history = [-_dist(a, cur, keys)]
    for r in range(rounds):
        _map_phase(maps, a, cur, transform, keys)
        if has_groups:  # permutation phase against the adjoint of the transform, from here and afresh
            adj = _adjoint(maps, transform, a)
            fresh = ((None, None),) if r == 0 else ()  # afresh only once: a start far from the first one
            for start, unknown in ((perm, ()), *fresh):
                new_perm = descend(spec, adj, b, start, None, restarts=1, unknown=unknown,
                                   **{**kw, "seed": kw["seed"] + r})
                trial = apply_transform([m for m, _ in maps], transform, apply_permutation(spec, new_perm, b))
                if _dist(a, trial, keys) < _dist(a, cur, keys):
                    perm, cur = new_perm, trial
        history.append(-_dist(a, cur, keys))
        if history[-1] <= history[-2] + TOL * abs(history[-2]):
            break
    return perm, transform, history


def refine_maps(spec: PermutationSpec, maps, state_a, state_b, perm, transform, only) -> Transform:
    """``transform`` with the maps in ``only`` (names) moved by weight steps, every other symmetry
    fixed at ``perm`` and ``transform``, until none moves (norms folded first)."""
    plain = [m for m, _ in maps]
    a, b = fold_norms(plain, state_a), fold_norms(plain, state_b)
    transform = Transform({k: v.clone() for k, v in transform.items()})
    cur = apply_transform(plain, transform, apply_permutation(spec, perm, b) if spec.group_sizes else b)
    _map_phase([(m, k) for m, k in maps if m.name in only], a, cur, transform, keys=None)
    return transform


def _map_phase(maps, a, cur, transform, keys, sweeps: int = 50) -> None:
    """Sweep ``maps`` (in place on ``cur`` and ``transform``) until none moves or a sweep lowers the
    distance over ``keys`` (None: the maps' sites) by less than ``TOL`` of it."""
    keys = keys if keys is not None else sorted({s.key for m, _ in maps for s in m.sites})
    for _ in range(sweeps):
        before, moved = _dist(a, cur, keys), False
        for m, kind in maps:
            res = _step(m, kind, a, cur, transform[m.name])
            if res is not None:
                transform[m.name], trial = res
                cur.update(trial)
                moved = True
        if not moved or before - _dist(a, cur, keys) <= TOL * before:
            break
