"""Elements of a spec's continuous symmetries (:class:`~autoperm.maps.map.Map`), and applying them.

A :class:`Transform` maps each map's name to its value: ``[blocks, n, n]`` matrices (``"orthogonal"``,
``"invertible"``), ``[blocks, n]`` positive factors (``"scale"``) or ``[blocks, len(pairs)]`` angles
(``"rotary"``). A map missing from a transform is the identity. Transforms act *after* a permutation:
``apply_transform(spec, t, apply_permutation(spec, p, sd))``.

>>> import torch
>>> from autoperm.maps.map import Map, Site
>>> m = Map("h", "orthogonal", 3, sites=(Site("w1", 0, "primal"), Site("w2", 1, "dual")))
>>> sd = {"w1": torch.randn(3, 2), "w2": torch.randn(4, 3)}
>>> out = apply_transform([m], random_transform([m], seed=1), sd)
>>> torch.allclose(out["w2"] @ out["w1"], sd["w2"] @ sd["w1"], atol=1e-6)
True
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .map import Map

__all__ = ["Transform", "random_transform", "identity_transform", "apply_transform", "transform_matrices",
           "fold_norms", "unfold_norms", "maps_of"]


class Transform(dict):
    """``{map name: value}``; see the module docstring for each kind's value."""


def maps_of(spec_or_maps) -> list[Map]:
    """The maps of a spec (its ``maps``), or the list itself."""
    maps = getattr(spec_or_maps, "maps", spec_or_maps)
    return list(maps or [])


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _ones_basis(n: int) -> torch.Tensor:
    """An orthonormal basis whose first column is the normalised all-ones vector."""
    e = torch.eye(n, dtype=torch.float64)
    e[:, 0] = 1.0
    q, r = torch.linalg.qr(e)
    return q * torch.sign(torch.diagonal(r))[None, :]


def centered(q: torch.Tensor) -> torch.Tensor:
    """``q`` (``[.., n-1, n-1]`` orthogonal) as an ``n × n`` orthogonal matrix that fixes the all-ones vector."""
    n = q.shape[-1] + 1
    h = _ones_basis(n)
    full = torch.zeros(*q.shape[:-2], n, n, dtype=torch.float64)
    full[..., 0, 0] = 1.0
    full[..., 1:, 1:] = q.to(torch.float64)
    return h @ full @ h.T


def random_transform(spec_or_maps, seed: int = 0, kinds: Sequence[str] | None = None) -> Transform:
    """A random element of every map (of ``kinds`` only, if given), reproducible for ``seed``.

    Orthogonal matrices are Haar-random; invertible ones ``Q1 diag(e^u) Q2`` with ``u`` in [-0.5, 0.5]
    (condition number below e); scales ``e^u`` with ``u`` in [-1, 1]; angles uniform in [-π, π].
    """
    g = torch.Generator().manual_seed(seed)
    out = Transform()
    for m in maps_of(spec_or_maps):
        if kinds is not None and m.kind not in kinds:
            continue
        b, n = m.blocks, m.size
        if m.kind == "orthogonal":
            if m.center:
                out[m.name] = centered(torch.stack([_orthogonal(n - 1, g) for _ in range(b)])) if n > 1 \
                    else torch.ones(b, 1, 1, dtype=torch.float64)
            else:
                out[m.name] = torch.stack([_orthogonal(n, g) for _ in range(b)])
        elif m.kind == "invertible":
            u = torch.rand(b, n, generator=g, dtype=torch.float64) - 0.5
            out[m.name] = torch.stack([_orthogonal(n, g) @ torch.diag(u[i].exp()) @ _orthogonal(n, g) for i in range(b)])
        elif m.kind == "scale":
            out[m.name] = (2 * torch.rand(b, n, generator=g, dtype=torch.float64) - 1).exp()
        else:
            out[m.name] = (2 * torch.rand(b, len(m.pairs), generator=g, dtype=torch.float64) - 1) * math.pi
    return out


def identity_transform(spec_or_maps) -> Transform:
    """The identity element of every map."""
    out = Transform()
    for m in maps_of(spec_or_maps):
        if m.kind in ("orthogonal", "invertible"):
            out[m.name] = torch.eye(m.size, dtype=torch.float64).expand(m.blocks, m.size, m.size).clone()
        elif m.kind == "scale":
            out[m.name] = torch.ones(m.blocks, m.size, dtype=torch.float64)
        else:
            out[m.name] = torch.zeros(m.blocks, len(m.pairs), dtype=torch.float64)
    return out


def transform_matrices(m: Map, value: torch.Tensor) -> torch.Tensor:
    """Map ``m``'s element ``value`` as ``[blocks, n, n]`` float64 matrices ``A_b``.

    >>> from autoperm.maps.map import Map
    >>> r = Map("r", "rotary", 4, pairs=((0, 2), (1, 3)))
    >>> transform_matrices(r, torch.tensor([[math.pi / 2, 0.0]]))[0].round().int().tolist()
    [[0, 0, -1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    """
    v = torch.as_tensor(value, dtype=torch.float64)
    b, n = m.blocks, m.size
    if m.kind in ("orthogonal", "invertible"):
        want = (b, n, n)
    elif m.kind == "scale":
        want = (b, n)
    else:
        want = (b, len(m.pairs))
    if tuple(v.shape) != want:
        raise ValueError(f"map {m.name!r} ({m.kind}) takes a value of shape {want}, got {tuple(v.shape)}")
    if m.kind in ("orthogonal", "invertible"):
        return v
    if m.kind == "scale":
        if bool((v <= 0).any()):
            raise ValueError(f"scale map {m.name!r} takes positive factors")
        return torch.diag_embed(v)
    a = torch.eye(n, dtype=torch.float64).expand(b, n, n).clone()
    c, s = v.cos(), v.sin()
    for k, (i, j) in enumerate(m.pairs):
        a[:, i, i], a[:, i, j], a[:, j, i], a[:, j, j] = c[:, k], -s[:, k], s[:, k], c[:, k]
    return a


def _dual(m: Map, a: torch.Tensor) -> torch.Tensor:
    if m.kind in ("orthogonal", "rotary"):
        return a
    return torch.linalg.inv(a).transpose(-1, -2)


def _act(t: torch.Tensor, axis: int, idx: torch.Tensor, mats: torch.Tensor, key: str) -> torch.Tensor:
    """``t`` with block ``b``'s positions ``idx[b]`` on ``axis`` replaced by ``mats[b] @`` them."""
    if int(idx.max()) >= t.shape[axis]:
        raise ValueError(f"{key!r} axis {axis} has {t.shape[axis]} indices, the map reaches index {int(idx.max())}")
    x = t.to(torch.float64).movedim(axis, -1).clone()
    sub = x[..., idx]  # [..., blocks, n]
    x[..., idx] = torch.einsum("bij,...bj->...bi", mats, sub)
    return x.movedim(-1, axis).to(t.dtype)


def apply_transform(spec_or_maps, transform: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A new state dict with ``transform`` applied (norms of the maps it moves folded first); the input is kept.

    Raises:
        KeyError: a map's tensor is missing from ``state_dict`` (named).
        ValueError: ``transform`` names no map of the spec, has a value of the wrong shape, or a norm
            shift cannot be folded (a reader without a bias).
    """
    maps = {m.name: m for m in maps_of(spec_or_maps)}
    unknown = [k for k in transform if k not in maps]
    if unknown:
        raise ValueError(f"transform has values for maps the spec does not have: {unknown}")
    moved = [maps[k] for k in transform]
    out = fold_norms(moved, state_dict)
    for m in moved:
        a = transform_matrices(m, transform[m.name])
        ad = _dual(m, a)
        for s in m.sites:
            if s.key not in out:
                raise KeyError(f"state dict has no key {s.key!r} that map {m.name!r} acts on")
            idx = torch.tensor([s.index(b, m.size) for b in range(m.blocks)], dtype=torch.long)
            out[s.key] = _act(out[s.key], s.axis, idx, a if s.role == "primal" else ad, s.key)
    return out


def _scale_of(f, state) -> torch.Tensor | None:
    if f.weight is None:
        return None
    w = state[f.weight].to(torch.float64)
    return w + 1 if f.plus_one else w


def _along(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * t.dim()
    shape[axis] = -1
    return v.reshape(shape)


def fold_norms(spec_or_maps, state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A new state dict, same function, where every fold's norm is a pure normalisation (scale 1, shift 0)
    and its readers carry the scale and shift instead."""
    out = dict(state_dict)
    for m in maps_of(spec_or_maps):
        for f in m.folds:
            w, b = _scale_of(f, out), (out[f.bias].to(torch.float64) if f.bias else None)
            for key, axis, bkey in f.readers:
                t = out[key]
                t64 = t.to(torch.float64)
                if b is not None and bool(b.ne(0).any()):
                    if bkey is None:
                        raise ValueError(f"cannot fold the shift {f.bias!r} into {key!r}: that layer has no bias")
                    c = out[bkey].to(torch.float64) + torch.tensordot(t64, b, dims=([axis], [0]))
                    out[bkey] = c.to(out[bkey].dtype)
                if w is not None:
                    t64 = t64 * _along(w, t64, axis)
                out[key] = t64.to(t.dtype)
            if f.weight is not None:
                out[f.weight] = torch.zeros_like(out[f.weight]) if f.plus_one else torch.ones_like(out[f.weight])
            if f.bias is not None:
                out[f.bias] = torch.zeros_like(out[f.bias])
    return out


def unfold_norms(spec_or_maps, state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict:
    """A new state dict, same function as ``state_dict`` (whose folded norms must be pure normalisations),
    whose norms carry ``reference``'s scales and shifts and whose readers compensate.

    Aligning B to A folds B, moves it, then unfolds it with A's norms, so the two can be averaged.

    Raises:
        ValueError: a reference scale has a zero entry (named).
    """
    out = dict(state_dict)
    for m in maps_of(spec_or_maps):
        for f in m.folds:
            w, b = _scale_of(f, reference), (reference[f.bias].to(torch.float64) if f.bias else None)
            if w is not None and bool((w == 0).any()):
                raise ValueError(f"norm scale {f.weight!r} has a zero entry: a folded layer cannot take it back")
            for key, axis, bkey in f.readers:
                t = out[key]
                t64 = t.to(torch.float64)
                if w is not None:
                    t64 = t64 / _along(w, t64, axis)
                if b is not None and bool(b.ne(0).any()):
                    if bkey is None:
                        raise ValueError(f"cannot unfold the shift {f.bias!r} from {key!r}: that layer has no bias")
                    c = out[bkey].to(torch.float64) - torch.tensordot(t64, b, dims=([axis], [0]))
                    out[bkey] = c.to(out[bkey].dtype)
                out[key] = t64.to(t.dtype)
            for k in (f.weight, f.bias):
                if k is not None:
                    out[k] = reference[k].to(out[k].dtype)
    return out
