"""Activation matching's counterpart for continuous symmetries: each map from the cross-covariance of the
two models' activations in its space.

A map's space is visible, in a model, wherever a layer writes or reads it directly:

- the output features of a linear layer (last axis), an embedding (last axis) or a convolution
  (channel axis) whose weight is a site of the map on its output axis;
- the input features of a linear layer whose weight is a dual site on its input axis, unless it reads
  the space through a norm whose scale the map folds (the reader sees the norm's output, not the space);
- the input of each folded norm (the residual stream itself).

If B's weights are ``T(B_A)`` for some element, each such activation of B is ``A_b`` times A's
(``A_b^{-T}`` for a dual site on an output axis: the key side of a query·key product; not used for
scales). So with ``Y`` A's activations and ``X`` B's, the
element is the best fit of ``A_b X`` to ``Y``: Procrustes on ``Σ Y X^T`` (orthogonal, centred, rotary;
the same closed forms as weight matching's steps), ``Σ Y X / Σ X²`` per unit (scale), and for
invertible maps the least-squares fit of ``A X`` to ``Y`` where activations follow ``A`` and of ``Aᵀ Y``
to ``X`` where they follow ``A^{-T}`` (one Sylvester equation, as in weight matching).
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from .._load import load_state_
from ..barrier.norm import _input as batch_input
from ..maps.element import Transform
from ..maps.map import Map
from ._map_steps import site_rows, solve_map

__all__ = ["map_sources", "activation_transform"]


def _module_of(key: str, modules: dict):
    name, _, leaf = key.rpartition(".")
    return (name, modules[name]) if leaf == "weight" and name in modules else (None, None)


def map_sources(m: Map, model: nn.Module) -> list[tuple]:
    """``[(module name, "in" or "out", channel axis, rows [blocks, n], follows A)]``: where ``m``'s space
    shows in ``model``'s activations (see the module docstring); ``follows A`` is False for a dual site on
    an output axis (activations move by ``A^{-T}``)."""
    modules = dict(model.named_modules())
    readers = {r[0] for f in m.folds for r in f.readers}
    out, seen = [], set()
    for s in m.sites:
        name, mod = _module_of(s.key, modules)
        rows = site_rows(m, s)
        if isinstance(mod, nn.Linear) and s.axis == 0:
            out.append((name, "out", -1, rows, s.role == "primal"))
        elif isinstance(mod, nn.Embedding) and s.axis == 1:
            out.append((name, "out", -1, rows, s.role == "primal"))
        elif isinstance(mod, nn.modules.conv._ConvNd) and not isinstance(mod, nn.modules.conv._ConvTransposeNd) \
                and s.axis == 0 and mod.groups == 1:
            out.append((name, "out", 1, rows, s.role == "primal"))
        elif isinstance(mod, nn.Linear) and s.axis == 1 and s.role == "dual" and s.key not in readers:
            out.append((name, "in", -1, rows, True))
    if m.blocks == 1:
        for f in m.folds:
            name, mod = _module_of(f.weight, modules) if f.weight else (None, None)
            if mod is not None and name not in seen:
                seen.add(name)
                out.append((name, "in", -1, torch.arange(m.size)[None], True))
    return out


class _Moments:
    """``yx = Σ Y Xᵀ`` over every source, ``xx = Σ X Xᵀ`` over those that follow ``A``, ``yy = Σ Y Yᵀ`` over
    those that follow ``A^{-T}`` (``[blocks, n, n]`` float64)."""

    def __init__(self):
        self.yx = self.xx = self.yy = None

    def add(self, y: torch.Tensor, x: torch.Tensor, follows: bool) -> None:  # [N, blocks, n] each
        yx = torch.einsum("tbi,tbj->bij", y, x)
        self.yx = yx if self.yx is None else self.yx + yx
        if self.xx is None:
            self.xx, self.yy = torch.zeros_like(yx), torch.zeros_like(yx)
        if follows:
            self.xx += torch.einsum("tbi,tbj->bij", x, x)
        else:
            self.yy += torch.einsum("tbi,tbj->bij", y, y)


def _pick(t: torch.Tensor, axis: int, rows: torch.Tensor) -> torch.Tensor:
    t = t.movedim(axis, -1)
    return t.reshape(-1, t.shape[-1])[:, rows.reshape(-1).to(t.device)].to(torch.float64).reshape(-1, *rows.shape)


@torch.no_grad()
def activation_transform(maps: list[tuple[Map, str]], model_a: nn.Module, model_b: nn.Module,
                         batches: Iterable) -> tuple[Transform, list]:
    """``(transform, maps without sources)``: every map with activation sources, estimated from
    ``model_a``'s and ``model_b``'s activations on ``batches`` (B already permuted); neither model is
    modified (their modes are restored)."""
    plan = {}
    for m, kind in maps:
        src = [s for s in map_sources(m, model_a) if s[4] or kind in ("orthogonal", "rotary", "invertible")]
        if src:
            plan[m.name] = (m, kind, src, _Moments())
    captured: dict = {}
    handles = []
    for which, model in (("a", model_a), ("b", model_b)):
        modules = dict(model.named_modules())
        for name in {s[0] for _, _, src, _ in plan.values() for s in src}:
            def hook(mod, args, out, which=which, name=name):
                captured[(which, name, "in")] = args[0] if args and isinstance(args[0], torch.Tensor) else None
                captured[(which, name, "out")] = out if isinstance(out, torch.Tensor) else None
            handles.append(modules[name].register_forward_hook(hook))
    modes = {mod: mod.training for mod in (*model_a.modules(), *model_b.modules())}
    model_a.eval()
    model_b.eval()
    try:
        for batch in batches:
            x = batch_input(batch)
            args = x if isinstance(x, tuple) else (x,)
            captured.clear()
            model_a(*args)
            got_a = dict(captured)
            captured.clear()
            model_b(*args)
            got_b = dict(captured)
            for m, kind, src, mom in plan.values():
                for name, side, axis, rows, follows in src:
                    y, xb = got_a.get(("a", name, side)), got_b.get(("b", name, side))
                    if y is None or xb is None or y.shape != xb.shape:
                        continue
                    mom.add(_pick(y, axis, rows), _pick(xb, axis, rows), follows)
    finally:
        for h in handles:
            h.remove()
        for mod, mode in modes.items():
            mod.training = mode
    out, missing = Transform(), [(m, k) for m, k in maps if m.name not in plan]
    for m, kind, _, mom in plan.values():
        if mom.yx is None:
            missing.append((m, kind))
            continue
        yx, xx = mom.yx.cpu(), mom.xx.cpu()
        if kind in ("orthogonal", "rotary"):
            out[m.name] = solve_map(m, kind, {"M": yx})
        elif kind == "scale":
            num, den = torch.diagonal(yx, dim1=1, dim2=2), torch.diagonal(xx, dim1=1, dim2=2)
            s = num / den.clamp_min(1e-300)
            out[m.name] = torch.where((s > 0) & (den > 0), s, torch.ones_like(s))
        else:
            out[m.name] = solve_map(m, "invertible", {"Spp": xx, "Sdd": mom.yy.cpu(), "C": yx})
    return out, missing


def permuted_copy(spec, perm, model: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``perm`` applied (the input is not modified)."""
    from ..permutation import apply_permutation
    b = copy.deepcopy(model)
    load_state_(b, apply_permutation(spec, perm, model.state_dict()))
    return b
