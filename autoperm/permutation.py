"""Permutations of a spec's groups, and applying them to state dicts and models.

A ``Permutation`` maps each group name to a LongTensor ``p`` of its size.
Applying it sets every member axis to ``new[i] = old[p[i]]``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ._load import keep_metadata
from .spec import PermutationSpec

__all__ = [
    "Permutation", "random_permutation", "identity_permutation", "inverse_permutation",
    "compose_permutations", "apply_permutation", "permute_model_", "axis_index", "validate_permutation",
]

Permutation = dict  # dict[str, torch.LongTensor]


def random_permutation(spec: PermutationSpec, seed: int = 0) -> Permutation:
    """A uniformly random permutation of every group (deterministic for ``seed``).

    >>> from autoperm.spec import PermutationSpec
    >>> spec = PermutationSpec.from_axes({"w": [{"g": "h"}]}, {"h": 4})
    >>> sorted(random_permutation(spec, seed=1)["h"].tolist())
    [0, 1, 2, 3]
    """
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(s, generator=gen) for n, s in spec.group_sizes.items()}


def identity_permutation(spec: PermutationSpec) -> Permutation:
    """The identity on every group."""
    return {n: torch.arange(s) for n, s in spec.group_sizes.items()}


def inverse_permutation(perm: Permutation) -> Permutation:
    """``inverse(p)[p[i]] = i`` for every group.

    >>> inverse_permutation({"h": torch.tensor([2, 0, 1])})["h"].tolist()
    [1, 2, 0]
    """
    return {n: torch.argsort(_as_perm(n, p)) for n, p in perm.items()}


def compose_permutations(first: Permutation, then: Permutation) -> Permutation:
    """The permutation equal to applying ``first`` and then ``then``.

    Applying ``p`` maps ``x`` to ``x[p]``; applying ``q`` next gives ``x[p][q] = x[p[q]]``.

    >>> compose_permutations({"h": torch.tensor([1, 2, 0])}, {"h": torch.tensor([1, 2, 0])})["h"].tolist()
    [2, 0, 1]
    """
    if set(first) != set(then):
        raise ValueError(f"the permutations name different groups: {sorted(set(first) ^ set(then))[:5]}")
    out = {}
    for n in first:
        p, q = _as_perm(n, first[n]), _as_perm(n, then[n])
        if len(p) != len(q):
            raise ValueError(f"group {n!r}: permutations of sizes {len(p)} and {len(q)} do not compose")
        out[n] = p[q]
    return out


def _as_perm(name: str, p) -> torch.Tensor:
    """``p`` as a LongTensor, or ValueError naming the group if it is not a permutation of 0..n-1."""
    p = torch.as_tensor(p)
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool or p.dim() != 1:
        raise ValueError(f"group {name!r}: a permutation is a 1-d integer tensor, got {p.dtype} of shape "
                         f"{tuple(p.shape)}")
    if not torch.equal(torch.sort(p.long().cpu()).values, torch.arange(len(p))):
        raise ValueError(f"group {name!r}: not a permutation of 0..{len(p) - 1}")
    return p.long()


def validate_permutation(spec: PermutationSpec, perm: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the group if ``perm`` is not a permutation of each group of ``spec``."""
    for name, size in spec.group_sizes.items():
        if name not in perm:
            raise ValueError(f"permutation has no entry for group {name!r}")
        p = torch.as_tensor(perm[name])
        if p.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"group {name!r}: permutation must be an integer tensor, got {p.dtype}")
        if p.shape != (size,):
            raise ValueError(f"group {name!r}: permutation has shape {tuple(p.shape)}, the group has size {size}")
        if not torch.equal(torch.sort(p.long().cpu()).values, torch.arange(size)):
            raise ValueError(f"group {name!r}: not a permutation of 0..{size - 1}")
    extra = set(perm) - set(spec.group_sizes)
    if extra:
        raise ValueError(f"permutation names groups the spec does not have: {sorted(extra)[:5]}")


def axis_index(expr, perm: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The gather index an axis expression takes under ``perm`` (None: identity).

    >>> axis_index({"prod": [{"g": "h"}, {"fixed": 2}]}, {"h": torch.tensor([1, 0])}).tolist()
    [2, 3, 0, 1]
    """
    if expr is None:
        return None
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
    for key, exprs in spec.axes.items():
        if key not in state_dict:
            raise KeyError(f"state dict has no key {key!r} that the spec permutes")
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"state dict value {key!r} is not a tensor ({type(t).__name__})")
        want = spec.shapes.get(key)
        if t.dim() != len(exprs) or (want is not None and list(t.shape) != list(want)):
            raise ValueError(f"{key!r} has shape {tuple(t.shape)}, the spec expects {want or f'{len(exprs)} axes'}")
        for axis, e in enumerate(exprs):
            idx = axis_index(e, perm)
            if idx is None:
                continue
            if len(idx) != t.shape[axis]:
                raise ValueError(f"{key!r} axis {axis} has size {t.shape[axis]}, the spec expects {len(idx)}")
            t = t.index_select(axis, idx.to(t.device))
        out[key] = t
    return keep_metadata(out, state_dict)


@torch.no_grad()
def permute_model_(model: torch.nn.Module, spec: PermutationSpec, perm: Permutation) -> torch.nn.Module:
    """Apply ``perm`` to ``model``'s parameters and buffers in place; returns the model.

    Caches a module computed from its old weights (timm's LeViT attention biases) are dropped.
    """
    from ._load import drop_weight_caches_

    sd = model.state_dict()
    new = apply_permutation(spec, perm, sd)
    for k in spec.axes:
        sd[k].copy_(new[k])
    return drop_weight_caches_(model)
