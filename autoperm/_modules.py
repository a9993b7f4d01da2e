"""Module groups: whole modules (experts in an ``nn.ModuleList``) that move with the units of a group.

A ``ModuleGroup`` (``spec.modules``) ties group ``axis`` (the routing's expert axis) to modules
``prefixes[0], prefixes[1], ...``: a permutation ``p`` of ``axis`` moves module ``p[i]``'s tensors
into slot ``i`` (``new[prefixes[i] + k] = old[prefixes[p[i]] + k]``), with ``axis`` acting on every
other tensor that carries it (router rows) as any group does. Each family of local groups
(``local[f]``, one group per module) is the module's own inner permutation: slot ``i``'s group
``local[f][i]`` is applied to the tensors slot ``i`` receives, so
``new[prefixes[i] + k] = P_i(old[prefixes[p[i]] + k])``. Composition and inversion follow as for
groups per block: applying ``(p, q)`` then ``(p2, q2)`` is ``(p[p2], q[p2[i]] ∘ q2[i])``.

>>> from autoperm.spec import PermutationSpec
>>> spec = PermutationSpec.from_axes(
...     {"router.weight": [{"g": "e"}, None], "ex.0.w": [{"g": "h0"}, None], "ex.1.w": [{"g": "h1"}, None]},
...     {"e": 2, "h0": 3, "h1": 3}, shapes={"router.weight": [2, 4], "ex.0.w": [3, 4], "ex.1.w": [3, 4]},
...     modules=[{"group": "e", "prefixes": ["ex.0.", "ex.1."], "local": [["h0", "h1"]]}])
>>> import torch
>>> module_sources(spec, {"e": torch.tensor([1, 0])})
{'ex.0.w': 'ex.1.w', 'ex.1.w': 'ex.0.w'}
"""
from __future__ import annotations

import torch

from .spec import walk_groups

__all__ = ["check_modules", "module_keys", "module_sources", "slots_moved", "rename_local"]


def module_keys(spec, m) -> list[list[str]]:
    """The state-dict keys of each module of ``m`` (from ``spec.shapes``, else ``spec.axes``), slot by slot."""
    keys = list(spec.shapes or spec.axes)
    return [[k for k in keys if k.startswith(p)] for p in m.prefixes]


def rename_local(expr, names: dict):
    """``expr`` with the groups in ``names`` renamed (JSON-ready copy)."""
    if not expr or "fixed" in expr:
        return expr
    if "g" in expr:
        return {"g": names.get(expr["g"], expr["g"])}
    kind, parts = next(iter(expr.items()))
    return {kind: [rename_local(e, names) for e in parts]}


def check_modules(spec) -> None:
    """Raise ValueError (naming the group or key) if ``spec.modules`` cannot be applied as declared."""
    seen_prefixes: list[str] = []
    axes_groups = {m.axis for m in spec.modules}
    for m in spec.modules:
        n = spec.group_sizes.get(m.axis)
        if n is None:
            raise ValueError(f"module group moves with {m.axis!r}, but the spec has no such group")
        if len(m.prefixes) != n or len(set(m.prefixes)) != n:
            raise ValueError(f"group {m.axis!r} has {n} units but its module group names {len(set(m.prefixes))} "
                             "distinct modules")
        if m.axis in spec.per or m.axis in spec.per.values():
            raise ValueError(f"group {m.axis!r} moves modules and cannot be per block or have groups per its blocks")
        for p in m.prefixes:
            if any(p.startswith(q) or q.startswith(p) for q in seen_prefixes):
                raise ValueError(f"module prefix {p!r} overlaps another module's")
            seen_prefixes.append(p)
        slots = module_keys(spec, m)
        rel = [sorted(k[len(p):] for k in ks) for p, ks in zip(m.prefixes, slots)]
        if not rel[0] or any(r != rel[0] for r in rel):
            raise ValueError(f"the modules moved by {m.axis!r} do not have the same keys ({m.prefixes[0]!r} ...)")
        for f in m.local:
            if len(f) != n or any(g not in spec.group_sizes for g in f):
                raise ValueError(f"a local family of {m.axis!r} needs one existing group per module, got {list(f)}")
            if len({spec.group_sizes[g] for g in f}) != 1 or set(f) & axes_groups:
                raise ValueError(f"the local family {list(f)} of {m.axis!r} mixes sizes or holds a module axis")
        local = [g for f in m.local for g in f]
        if len(set(local)) != len(local):
            raise ValueError(f"a group appears twice in the local families of {m.axis!r}")
        home = {g: i for f in m.local for i, g in enumerate(f)}
        token = {g: f"<local {j}>" for j, f in enumerate(m.local) for g in f}
        for key, exprs in spec.axes.items():
            inside = next((i for i, p in enumerate(m.prefixes) if key.startswith(p)), None)
            for e in exprs:
                for g in walk_groups(e):
                    if g == m.axis and inside is not None:
                        raise ValueError(f"{key} lies in a module moved by {m.axis!r} and carries that group")
                    if g in home and home[g] != inside:
                        raise ValueError(f"{key} carries {g!r}, a group local to module {m.prefixes[home[g]]!r}")
        for r in rel[0]:
            want = None
            for i, p in enumerate(m.prefixes):
                k = p + r
                shape = spec.shapes.get(k)
                exprs = [rename_local(e, token) for e in spec.axes[k]] if k in spec.axes else None
                per = {token[g]: token.get(h, h) for g, h in spec.per.items() if g in token and home[g] == i}
                if want is None:
                    want = (shape, exprs, per)
                elif (shape, exprs, per) != want:
                    raise ValueError(f"{k} is not laid out as {m.prefixes[0] + r} (modules moved by {m.axis!r} "
                                     "must match up to their local groups)")


def module_sources(spec, perm) -> dict[str, str]:
    """``{key: source key}`` for every key a module move fills from another module under ``perm``."""
    out = {}
    for m in spec.modules:
        p = torch.as_tensor(perm[m.axis]).long().cpu().tolist()
        for i, j in enumerate(p):
            if i != j:
                for k in [k for k in (spec.shapes or spec.axes) if k.startswith(m.prefixes[i])]:
                    out[k] = m.prefixes[j] + k[len(m.prefixes[i]):]
    return out


def slots_moved(perm, modules, by: dict) -> dict:
    """``perm`` with each local family's entries re-indexed by slot: slot ``i`` takes the entry of slot
    ``by[axis][i]`` (composition and inversion move the inner permutations with their modules)."""
    out = dict(perm)
    for axis, local in modules:
        order = torch.as_tensor(by[axis]).long().cpu().tolist()
        for f in local:
            for i, j in enumerate(order):
                out[f[i]] = perm[f[j]]
    return out
