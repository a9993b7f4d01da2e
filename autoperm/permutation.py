"""Permutations of a spec's groups, and applying them to state dicts and models.

A ``Permutation`` maps each group name to a LongTensor ``p`` of its size.
Applying it sets every member axis to ``new[i] = old[p[i]]``. A group that is independent per
block of another (``spec.per[d] = h``) takes a ``[size(h), size(d)]`` tensor, one row per block:
``new[(i, j)] = old[(p[h][i], p[d][i][j])]`` (the row is that of the block's new position ``i``).
A group that moves whole modules (``spec.modules``, experts in an ``nn.ModuleList``) fills module slot
``i`` with module ``p[i]``'s tensors, each permuted by slot ``i``'s local groups (``autoperm._modules``).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ._load import keep_metadata
from .spec import PermutationSpec, walk_groups

__all__ = [
    "Permutation", "random_permutation", "identity_permutation", "inverse_permutation",
    "compose_permutations", "apply_permutation", "with_blocks", "permute_tensor", "permute_model_", "axis_index", "validate_permutation",
    "units_moved",
]

class Permutation(dict):
    """``{group: LongTensor}``; ``per`` names the block group of each per-block entry (as ``spec.per``).

    Every autoperm function that makes a permutation returns one, so ``inverse_permutation`` and
    ``compose_permutations`` know the block structure without the spec; a plain dict works too
    where no group is per block.
    """

    def __init__(self, *args, per=None, modules=None, **kw):
        super().__init__(*args, **kw)
        self.per = dict(per or {})
        self.modules = list(modules or [])  # (module axis, local families) of each module group


def with_blocks(perm, spec_or_per) -> Permutation:
    """``perm`` as a :class:`Permutation` carrying the block groups and module groups of ``spec_or_per`` (a spec,
    a permutation, or a ``per`` dict)."""
    per = getattr(spec_or_per, "per", spec_or_per) or {}
    mods = getattr(spec_or_per, "modules", None) or []
    mods = [(m.axis, m.local) if hasattr(m, "axis") else m for m in mods]
    return Permutation(perm, per={d: h for d, h in per.items() if d in perm},
                       modules=[(a, loc) for a, loc in mods if a in perm])


def _modules_of(perm, spec) -> list:
    """The module groups (axis, local families) that ``perm`` moves, from ``spec`` or ``perm.modules``."""
    if spec is not None:
        return [(m.axis, m.local) for m in spec.modules if m.axis in perm]
    return list(getattr(perm, "modules", None) or [])


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Permutation:
    """A uniformly random permutation of every group (deterministic for ``seed``).

    >>> from autoperm.spec import PermutationSpec
    >>> spec = PermutationSpec.from_axes({"w": [{"g": "h"}]}, {"h": 4})
    >>> sorted(random_permutation(spec, seed=1)["h"].tolist())
    [0, 1, 2, 3]
    >>> heads = PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 3},
    ...                                   per={"d": "h"})
    >>> tuple(random_permutation(heads)["d"].shape)
    (2, 3)
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in spec.group_sizes.items():
        rows = [torch.randperm(s, generator=gen) for _ in range(spec.block_count(n))]
        out[n] = torch.stack(rows) if n in spec.per else rows[0]
    return with_blocks(out, spec)


def units_moved(perm) -> int:
    """How many entries of ``perm`` are not at their own index (out of ``spec.num_rows``: a per-block group counts every row).

    >>> units_moved({"h": torch.tensor([1, 0, 2]), "d": torch.tensor([[0, 1], [1, 0]])})
    4
    """
    return sum(int((torch.as_tensor(p).cpu() != torch.arange(p.shape[-1])).sum()) for p in perm.values())


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The identity on every group (one identity row per block for a group that is per block)."""
    return with_blocks({n: torch.arange(s).repeat(spec.block_count(n), 1) if n in spec.per else torch.arange(s)
                        for n, s in spec.group_sizes.items()}, spec)


def inverse_permutation(perm: Permutation, spec: PermutationSpec | None = None) -> Permutation:
    """``inverse(p)[p[i]] = i`` for every group; per-block groups (2-d entries) need their block groups, from
    ``spec`` or ``perm.per``.

    For a group ``d`` per ``h``: ``inverse[h] = argsort(p[h])`` and ``inverse[d][p[h][i]] = argsort(p[d][i])``.

    >>> inverse_permutation({"h": torch.tensor([2, 0, 1])})["h"].tolist()
    [1, 2, 0]
    >>> from autoperm.spec import PermutationSpec
    >>> spec = PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 2}, per={"d": "h"})
    >>> inverse_permutation({"h": torch.tensor([1, 0]), "d": torch.tensor([[0, 1], [1, 0]])}, spec)["d"].tolist()
    [[1, 0], [0, 1]]
    """
    per = _per_of(perm, spec)
    out = {n: torch.argsort(_as_perm(n, p)) for n, p in perm.items() if n not in per}
    for n, h in per.items():
        out[n] = torch.argsort(_as_rows(n, perm[n]), dim=1)[out[h]]
    mods = _modules_of(perm, spec)
    if mods:  # slot i of the inverse undoes the inner permutation of the module it sends back
        from ._modules import slots_moved
        out = slots_moved(out, mods, out)
    return Permutation(out, per=per, modules=mods)


def compose_permutations(first: Permutation, then: Permutation, spec: PermutationSpec | None = None) -> Permutation:
    """The permutation equal to applying ``first`` and then ``then``; per-block groups need their block groups,
    from ``spec`` or the permutations' ``per``.

    Applying ``p`` maps ``x`` to ``x[p]``; applying ``q`` next gives ``x[p][q] = x[p[q]]``. For a
    group ``d`` per ``h`` the rows follow the blocks: ``out[d][i] = first[d][then[h][i]][then[d][i]]``.

    >>> compose_permutations({"h": torch.tensor([1, 2, 0])}, {"h": torch.tensor([1, 2, 0])})["h"].tolist()
    [2, 0, 1]
    """
    if set(first) != set(then):
        raise ValueError(f"the permutations name different groups: {sorted(set(first) ^ set(then))[:5]}")
    per = _per_of(first, spec)
    mods = _modules_of(first, spec) or _modules_of(then, None)
    if mods:  # slot i receives the module then[axis][i] holds after first, with its inner permutation
        from ._modules import slots_moved
        first = slots_moved(first, mods, then)
    out = {}
    for n in first:
        if n in per:
            p, q = _as_rows(n, first[n]), _as_rows(n, then[n])
            if p.shape != q.shape:
                raise ValueError(f"group {n!r}: permutations of shapes {tuple(p.shape)} and {tuple(q.shape)} "
                                 "do not compose")
            out[n] = torch.gather(p[_as_perm(per[n], then[per[n]])], 1, q)
            continue
        p, q = _as_perm(n, first[n]), _as_perm(n, then[n])
        if len(p) != len(q):
            raise ValueError(f"group {n!r}: permutations of sizes {len(p)} and {len(q)} do not compose")
        out[n] = p[q]
    return Permutation(out, per=per, modules=mods)


def _per_of(perm, spec) -> dict:
    """The block group of each per-block entry of ``perm`` (2-d entries need a spec or ``perm.per`` that declares them)."""
    rows = [n for n, p in perm.items() if torch.as_tensor(p).dim() == 2]
    if spec is None and getattr(perm, "per", None):
        return {n: h for n, h in perm.per.items() if n in perm}
    if spec is None:
        if rows:
            raise ValueError(f"group {rows[0]!r} has one permutation per block: pass the spec, which names its "
                             "block group")
        return {}
    return {n: h for n, h in spec.per.items() if n in perm}


def _as_perm(name: str, p) -> torch.Tensor:
    """``p`` as a LongTensor, or ValueError naming the group if it is not a permutation of 0..n-1."""
    p = torch.as_tensor(p)
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool or p.dim() != 1:
        raise ValueError(f"group {name!r}: a permutation is a 1-d integer tensor, got {p.dtype} of shape "
                         f"{tuple(p.shape)}")
    if not torch.equal(torch.sort(p.long().cpu()).values, torch.arange(len(p))):
        raise ValueError(f"group {name!r}: not a permutation of 0..{len(p) - 1}")
    return p.long()


def _as_rows(name: str, p) -> torch.Tensor:
    """``p`` as a 2-d LongTensor whose every row is a permutation, or ValueError naming the group."""
    p = torch.as_tensor(p)
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool or p.dim() != 2:
        raise ValueError(f"group {name!r} is per block: its permutation is a 2-d integer tensor [blocks, size], "
                         f"got {p.dtype} of shape {tuple(p.shape)}")
    if not torch.equal(torch.sort(p.long().cpu(), dim=1).values, torch.arange(p.shape[1]).expand_as(p)):
        raise ValueError(f"group {name!r}: a row is not a permutation of 0..{p.shape[1] - 1}")
    return p.long()


def validate_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the group if ``perm`` is not a permutation of each group of ``spec``."""
    for name, size in spec.group_sizes.items():
        if name not in perm:
            raise ValueError(f"permutation has no entry for group {name!r}")
        p = torch.as_tensor(perm[name])
        if p.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"group {name!r}: permutation must be an integer tensor, got {p.dtype}")
        want = (spec.block_count(name), size) if name in spec.per else (size,)
        if p.shape != want:
            need = (f"the group needs {want} (one row per block of {spec.per[name]!r})" if name in spec.per
                    else f"the group has size {size}")
            raise ValueError(f"group {name!r}: permutation has shape {tuple(p.shape)}, {need}")
        if not torch.equal(torch.sort(p.long().cpu(), dim=-1).values, torch.arange(size).expand(want)):
            raise ValueError(f"group {name!r}: not a permutation of 0..{size - 1}"
                             f"{' in every row' if name in spec.per else ''}")
    extra = set(perm) - set(spec.group_sizes)
    if extra:
        raise ValueError(f"permutation names groups the spec does not have: {sorted(extra)[:5]}")


def axis_index(expr, perm: Mapping[str, torch.Tensor], spec: PermutationSpec | None = None) -> torch.Tensor | None:
    """The gather index an axis expression takes under ``perm`` (None: identity).

    Per-block groups need the ``spec``, and their block group as a direct part of an enclosing
    product of the same axis (``apply_permutation`` handles blocks given by another axis).

    >>> axis_index({"prod": [{"g": "h"}, {"fixed": 2}]}, {"h": torch.tensor([1, 0])}).tolist()
    [2, 3, 0, 1]
    >>> from autoperm.spec import PermutationSpec
    >>> spec = PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 3}, per={"d": "h"})
    >>> axis_index(spec.axes["w"][0], {"h": torch.tensor([1, 0]), "d": torch.tensor([[2, 1, 0], [0, 2, 1]])}, spec).tolist()
    [5, 4, 3, 0, 2, 1]
    """
    if expr is None:
        return None
    if spec is not None and spec.per and any(g in spec.per for g in walk_groups(expr)):
        from ._wreath import expr_size, old_coords
        n = expr_size(expr, spec.group_sizes)
        return old_coords(expr, torch.arange(n), {}, perm, spec.per, spec.group_sizes)
    if "g" in expr:
        return perm[expr["g"]].long().cpu()
    if "fixed" in expr:
        return torch.arange(expr["fixed"])
    parts = [axis_index(e, perm) for e in next(iter(expr.values()))]
    if "cat" in expr:
        out, off = [], 0
        for p in parts:
            out.append(p + off)
            off += len(p)
        return torch.cat(out)
    idx = torch.zeros(1, dtype=torch.long)
    for p in parts:
        idx = (idx[:, None] * len(p) + p[None, :]).reshape(-1)
    return idx


def apply_permutation(spec: PermutationSpec, perm: Permutation, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A new state dict with ``perm`` applied to every member axis; the input is not modified.

    Keys the spec does not permute are copied by reference.

    Raises:
        ValueError: ``perm`` is not a permutation of every group (names the group); the state dict
            has a key the spec's model does not have, or a tensor of another shape (names the key;
            a state dict of another architecture).
        KeyError: a key the spec permutes is missing.

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoperm.infer_spec(mlp, torch.randn(1, 4))
    >>> sd = apply_permutation(spec, random_permutation(spec, seed=3), mlp.state_dict())
    >>> x = torch.randn(5, 4); y = mlp(x); _ = mlp.load_state_dict(sd)
    >>> torch.allclose(mlp(x), y, atol=1e-6)
    True
    """
    validate_permutation(spec, perm)
    unexpected = [k for k in state_dict if spec.shapes and k not in spec.shapes]
    if unexpected:
        raise ValueError(f"state dict has keys the spec's model does not have: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''} (a state dict of another architecture?)")
    out = dict(state_dict)
    src = {}
    if spec.modules:
        from ._modules import module_sources
        src = module_sources(spec, perm)
        for key, old in src.items():
            if key not in spec.axes and key in state_dict:
                out[key] = state_dict[old]  # a tensor no group permutes moves with its module
    for key, exprs in spec.axes.items():
        if key not in state_dict or src.get(key, key) not in state_dict:
            raise KeyError(f"state dict has no key {src.get(key, key) if key in state_dict else key!r} that the spec permutes")
        t = state_dict[src.get(key, key)]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict value {key!r} is not a tensor ({type(t).__name__})")
        want = spec.shapes.get(key)
        if t.dim() != len(exprs) or (want is not None and list(t.shape) != list(want)):
            raise ValueError(f"{key!r} has shape {tuple(t.shape)}, the spec expects {want or f'{len(exprs)} axes'}")
        out[key] = permute_tensor(spec, perm, key, t)
    return keep_metadata(out, state_dict)


def permute_tensor(spec: PermutationSpec, perm: Permutation, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (the tensor of ``key``) with ``perm`` applied to its every axis (``perm`` is not validated here)."""
    exprs = spec.axes[key]
    later = []
    for axis, e in enumerate(exprs):
        if spec.per and _uncovered(e, spec.per):
            later.append(axis)  # its blocks come from another axis: gathered once that axis is
            continue
        idx = axis_index(e, perm, spec)
        if idx is None:
            continue
        if len(idx) != t.shape[axis]:
            raise ValueError(f"{key!r} axis {axis} has size {t.shape[axis]}, the spec expects {len(idx)}")
        t = t.index_select(axis, idx.to(t.device))
    for axis in later:
        t = _gather_by_block(spec, perm, exprs, axis, t, key)
    return t


def _uncovered(expr, per):
    from ._wreath import uncovered
    return uncovered(expr, per)


def _gather_by_block(spec, perm, exprs, axis, t, key):
    """Gather ``axis``, whose per-block groups take their block from another axis, one block index at a time."""
    from ._wreath import block_axis, coords_of, expr_size, old_coords
    h = spec.per[_uncovered(exprs[axis], spec.per)[0]]
    b = block_axis(exprs, axis, h)
    n = expr_size(exprs[axis], spec.group_sizes)
    if t.shape[axis] != n:
        raise ValueError(f"{key!r} axis {axis} has size {t.shape[axis]}, the spec expects {n}")
    blocks = coords_of(exprs[b], h, spec.group_sizes)
    envs = {g: blocks[:, None].expand(len(blocks), n) for g in {spec.per[d] for d in _uncovered(exprs[axis], spec.per)}}
    idx = old_coords(exprs[axis], torch.arange(n).expand(len(blocks), n), envs, perm, spec.per, spec.group_sizes)
    inner = axis if axis < b else axis - 1
    return torch.stack([t.select(b, i).index_select(inner, idx[i].to(t.device)) for i in range(len(blocks))], dim=b)


@torch.no_grad()
def permute_model_(model: torch.nn.Module, spec: PermutationSpec, perm: Permutation) -> torch.nn.Module:
    """Apply ``perm`` to ``model``'s parameters and buffers in place; returns the model.

    Caches a module computed from its old weights (timm's LeViT attention biases) are dropped.
    """
    from ._load import drop_weight_caches_

    sd = model.state_dict()
    new = apply_permutation(spec, perm, sd)
    swapped = set()
    if spec.modules:  # a module's tensors may arrive unchanged from another slot: copy them out before writing
        from ._modules import module_sources
        swapped = set(module_sources(spec, perm))
        new = {**new, **{k: new[k].clone() for k in swapped}}
    for k in set(spec.axes) | swapped:
        sd[k].copy_(new[k])
    return drop_weight_caches_(model)
