"""The matching step of each continuous symmetry kind, in closed form (the engine of map matching).

Everything here works on a map's *sites*: for site ``s`` and block ``b``, the ``[n, rest]`` matrix of
the tensor's positions ``s.index(b)`` on its axis (axis first). ``X`` is B's matrix with every other
symmetry applied and this map's own element removed; ``Y`` is A's. The step finds the element ``A_b``
that brings ``A_b · X`` (primal sites) and ``A_b^{-T} · X`` (dual sites) closest to ``Y``:

- orthogonal, rotary: ``max Σ <Y, A X>`` (the norm of ``A X`` does not depend on ``A``): Procrustes on
  ``M = Σ Y X^T`` (``U V^T`` from its SVD), restricted to the complement of the ones vector for a
  centred map, and per rotary pair ``θ = atan2(M_ji - M_ij, M_ii + M_jj)``;
- scale: per unit, ``min P s² - 2 p s + D / s² - 2 d / s`` (primal and dual terms), the positive root of
  a quartic;
- invertible: the least-squares surrogate ``min Σ_primal |Y - A X|² + Σ_dual |X - A^T Y|²``, linear in
  ``A``: one Sylvester equation (exact when B is an exact image of A).
"""
from __future__ import annotations

import numpy as np
import torch

from ..maps.element import _ones_basis, transform_matrices
from ..maps.map import Map

__all__ = ["site_rows", "gather_sites", "scatter_site", "solve_map", "matrices_of", "act"]


def site_rows(m: Map, s) -> torch.Tensor:
    """``[blocks, n]`` positions of site ``s`` on its axis."""
    return torch.tensor([s.index(b, m.size) for b in range(m.blocks)], dtype=torch.long)


def gather_sites(t: torch.Tensor, axis: int, rows: torch.Tensor) -> torch.Tensor:
    """``t``'s positions ``rows`` ``[blocks, n]`` on ``axis`` as ``[blocks, n, rest]`` float64."""
    x = t.movedim(axis, 0).index_select(0, rows.reshape(-1).to(t.device)).to(torch.float64)
    return x.reshape(rows.shape[0], rows.shape[1], -1)


def scatter_site(t: torch.Tensor, axis: int, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with the positions ``rows`` on ``axis`` replaced by ``x`` (``[blocks, n, rest]``)."""
    out = t.movedim(axis, 0).clone()
    flat = rows.reshape(-1).to(t.device)
    out[flat] = x.reshape(len(flat), *out.shape[1:]).to(out.dtype)
    return out.movedim(0, axis)


def matrices_of(m: Map, value) -> torch.Tensor:
    return transform_matrices(m, value)


def act(mats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mats[b] @ x[b]`` for every block."""
    return torch.einsum("bij,bjr->bir", mats.to(x.device, x.dtype), x)


def _procrustes(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def solve_map(m: Map, kind: str, stats: dict) -> torch.Tensor:
    """The best element of ``m`` (as ``kind``) for the accumulated ``stats``:

    ``M`` ``[blocks, n, n]`` (``Σ Y X^T`` over every site) for orthogonal and rotary maps; ``p, P, d, D``
    ``[blocks, n]`` for scales; ``Spp = Σ_primal X X^T``, ``Sdd = Σ_dual Y Y^T`` and ``C = Σ_primal Y X^T +
    Σ_dual Y X^T`` for invertible maps. Returns the map's value (see ``autoperm.maps.element``).
    """
    if kind == "orthogonal":
        mm = stats["M"]
        if m.center and m.size > 1:
            h = _ones_basis(m.size).to(mm.device)
            sub = (h.T @ mm @ h)[:, 1:, 1:]
            full = torch.zeros_like(mm)
            full[:, 0, 0] = 1.0
            full[:, 1:, 1:] = _procrustes(sub)
            return h @ full @ h.T
        return _procrustes(mm)
    if kind == "rotary":
        mm = stats["M"]
        i = torch.tensor([p[0] for p in m.pairs])
        j = torch.tensor([p[1] for p in m.pairs])
        return torch.atan2(mm[:, j, i] - mm[:, i, j], mm[:, i, i] + mm[:, j, j])
    if kind == "scale":
        return _scales(stats["p"], stats["P"], stats["d"], stats["D"])
    if kind == "invertible":
        return _sylvester(stats["Spp"], stats["Sdd"], stats["C"])
    raise ValueError(f"no matching step for kind {kind!r}")


def _scales(p, P, d, D) -> torch.Tensor:
    """Per unit, the ``s > 0`` minimising ``P s² - 2 p s + D / s² - 2 d / s``: a root of
    ``P s⁴ - p s³ + d s - D = 0`` (1 where no term constrains the unit)."""
    shape = tuple(p.shape)
    p, P, d, D = (t.detach().cpu().double().numpy().reshape(-1) for t in (p, P, d, D))
    out = np.ones_like(p)
    for k in range(len(p)):
        coeffs = [P[k], -p[k], 0.0, d[k], -D[k]]
        while coeffs and abs(coeffs[0]) <= 1e-300:
            coeffs = coeffs[1:]
        if len(coeffs) < 2:
            continue
        roots = np.roots(coeffs)
        real = roots[(np.abs(roots.imag) <= 1e-9 * np.abs(roots).max()) & (roots.real > 0)].real
        if not len(real):
            continue
        f = P[k] * real ** 2 - 2 * p[k] * real + D[k] / real ** 2 - 2 * d[k] / real
        out[k] = real[np.argmin(f)]
    return torch.from_numpy(out).reshape(shape)


def _sylvester(spp, sdd, c) -> torch.Tensor:
    """Per block, ``A`` with ``Sdd A + A Spp = C`` (a ridge towards the identity keeps it unique)."""
    from scipy.linalg import solve_sylvester

    out = []
    for b in range(c.shape[0]):
        s1, s2, cb = (t[b].detach().cpu().double().numpy() for t in (spp, sdd, c))
        n = len(cb)
        lam = 1e-10 * max(np.trace(s1) + np.trace(s2), 1e-300) / n
        out.append(solve_sylvester(s2 + lam * np.eye(n), s1, cb + lam * np.eye(n)))
    return torch.from_numpy(np.stack(out))
