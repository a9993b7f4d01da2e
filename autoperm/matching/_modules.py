"""Matching module groups (``spec.modules``: experts held in an ``nn.ModuleList``): the module step.

Coordinate descent runs on the spec without its module groups, with every module move held in
place (B's modules already moved, the expert axes at the identity). Then, for each module group,
every pair (module ``i`` of A, module ``j`` of B) is aligned on its own: its local groups are
matched by weight matching on the two modules' tensors (the shared groups, such as the residual
stream, applied), and the pair's value is ``Σ <A_i, Q(B_j)>`` over all of the module's tensors.
The modules are assigned on those values plus the expert axis' own cost outside the modules
(router rows), and slot ``i`` takes the local permutation found for its partner. A move is kept
only if it raises ``Σ <A, P(B)>``; the other groups then descend again, until nothing moves.
"""
from __future__ import annotations

import numpy as np
import torch

from ..permutation import apply_permutation, permute_tensor, with_blocks
from ..spec import PermutationSpec
from ._blocks import _plain_cost
from ._lap import solve_numpy

__all__ = ["descend_modules", "module_objective", "without_modules"]


def without_modules(spec: PermutationSpec) -> PermutationSpec:
    """The spec with its module groups dropped (the expert axis then acts on the router rows alone)."""
    return PermutationSpec.from_axes(spec.axes, spec.group_sizes, spec.pinned, spec.shapes, spec.unsupported, spec.per)


def module_objective(spec: PermutationSpec, a, b, perm) -> float:
    """``Σ <A, P(B)>`` (float64) over every floating tensor a permutation changes (module moves included)."""
    out = apply_permutation(spec, perm, b)
    keys = {k for k, ex in spec.axes.items() if any(ex)} | {
        k for k in (spec.shapes or spec.axes) if any(k.startswith(p) for m in spec.modules for p in m.prefixes)}
    return float(sum(torch.sum(a[k].double() * out[k].double()) for k in keys if a[k].is_floating_point()))


def _moved(spec, inner, b, perm) -> dict:
    """B with the module moves of ``perm`` applied (expert axes on the router rows too), every other group at the
    identity."""
    ident = {g: torch.arange(n).repeat(inner.block_count(g), 1) if g in inner.per else torch.arange(n)
             for g, n in spec.group_sizes.items()}
    ident.update({m.axis: torch.as_tensor(perm[m.axis]).long().cpu() for m in spec.modules})
    return apply_permutation(spec, with_blocks(ident, spec), b)


def descend_modules(spec: PermutationSpec, a, b, init, only, descend, *, rounds: int = 8, **kw) -> dict:
    """Coordinate descent with module steps (see the module docstring); ``descend`` is weight matching's
    ``descend_groups``. Groups outside ``only`` are held at ``init``."""
    if getattr(a, "local", None) is not None:
        raise NotImplementedError("module groups (experts in a ModuleList) are not matched over sharded states")
    inner = without_modules(spec)
    only = set(spec.group_sizes) if only is None else set(only)
    axes = {m.axis for m in spec.modules}
    movable = [m for m in spec.modules if m.axis in only and all(g in only for f in m.local for g in f)]
    rest = only - axes
    perm = {g: torch.as_tensor(p).long().cpu() for g, p in (init or {}).items()} or {
        g: torch.arange(n) for g, n in spec.group_sizes.items()}
    if init is None:
        perm = {g: (torch.arange(n).repeat(spec.block_count(g), 1) if g in spec.per else torch.arange(n))
                for g, n in spec.group_sizes.items()}
    unknown = kw.pop("unknown", None)
    for r in range(rounds):
        b1 = _moved(spec, inner, b, perm)
        start = {**perm, **{g: torch.arange(spec.group_sizes[g]) for g in axes}}
        found = descend(inner, a, b1, start, rest, unknown=unknown if r == 0 else (), **kw)
        perm = {**{g: torch.as_tensor(p).long().cpu() for g, p in found.items()}, **{g: perm[g] for g in axes}}
        moved = False
        for m in movable:
            perm, step = _module_step(spec, inner, a, b, perm, m, descend, kw)
            moved |= step
        if not moved:
            break
    return with_blocks(perm, spec)


def _submodule(spec, m):
    """The spec of one module (slot 0's relative keys), its local groups named by family, others frozen."""
    token = {g: f"local{j}" for j, f in enumerate(m.local) for g in f}

    def freeze(e):
        if not e or "fixed" in e:
            return e
        if "g" in e:
            return {"g": token[e["g"]]} if e["g"] in token else {"fixed": spec.group_sizes[e["g"]]}
        kind, parts = next(iter(e.items()))
        return {kind: [freeze(p) for p in parts]}

    p0 = m.prefixes[0]
    axes = {k[len(p0):]: [freeze(e) for e in ex] for k, ex in spec.axes.items() if k.startswith(p0)}
    axes = {k: ex for k, ex in axes.items() if any(ex)}
    sizes = {f"local{j}": spec.group_sizes[f[0]] for j, f in enumerate(m.local)}
    per = {token[d]: token[h] for d, h in spec.per.items() if d in token and h in token}
    return PermutationSpec.from_axes(axes, sizes, per=per)


def _module_step(spec, inner, a, b, perm, m, descend, kw) -> tuple[dict, bool]:
    n = len(m.prefixes)
    sub = _submodule(spec, m)
    rel = [k[len(m.prefixes[0]):] for k in (spec.shapes or spec.axes) if k.startswith(m.prefixes[0])]
    locals_ = {g for f in m.local for g in f}
    pc = {**perm, **{g: (torch.arange(spec.group_sizes[g]).repeat(spec.block_count(g), 1) if g in spec.per
                         else torch.arange(spec.group_sizes[g])) for g in locals_}}
    bs = {}  # B's modules with the shared groups applied, the local ones at the identity
    for p in m.prefixes:
        for r in rel:
            k = p + r
            bs[k] = permute_tensor(inner, pc, k, b[k]) if k in spec.axes else b[k]
    value = _plain_cost(inner, a, b, perm, m.axis)
    best = {}
    for i in range(n):
        ai = {r: a[m.prefixes[i] + r] for r in rel}
        for j in range(n):
            bj = {r: bs[m.prefixes[j] + r] for r in rel}
            q = descend(sub, ai, bj, None, None, **{**kw, "progress": False, "stats": None}) if sub.group_sizes else {}
            out = apply_permutation(sub, with_blocks(q, sub), bj) if sub.group_sizes else bj
            value[i, j] += float(sum(torch.sum(ai[r].double() * out[r].double()) for r in rel
                                     if ai[r].is_floating_point()))
            best[i, j] = q
    p_e = solve_numpy(np.ascontiguousarray(value))
    cand = {**perm, m.axis: torch.from_numpy(p_e)}
    for t, f in enumerate(m.local):
        for i in range(n):
            cand[f[i]] = torch.as_tensor(best[i, int(p_e[i])][f"local{t}"]).long().cpu()
    if all(torch.equal(cand[g], torch.as_tensor(perm[g]).cpu()) for g in cand):
        return perm, False
    before = module_objective(spec, a, b, with_blocks(perm, spec))
    after = module_objective(spec, a, b, with_blocks(cand, spec))
    return (cand, True) if after > before + 1e-12 * (abs(after) + abs(before)) else (perm, False)

