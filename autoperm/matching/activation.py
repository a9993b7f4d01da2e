"""Activation matching: align hidden units by the correlation of their activations on data."""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._float64 import float64_inputs, float64_model, is_float64
from ..barrier.norm import _input as batch_input
from ..distributed import all_reduce_, broadcast_permutation, check_same, rank
from ..permutation import Permutation, with_blocks
from ..spec import PermutationSpec, walk_groups
from ._costs import check_states
from ._lap import solve_numpy
from ._blocks import expand_rows
from .weight import descend_groups

__all__ = ["activation_matching", "activation_sites"]

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


def activation_sites(spec: PermutationSpec, model: nn.Module) -> dict:
    """``{module name: group}``: modules whose output carries a group on its channel axis.

    A module qualifies when one of its own parameters has the plain expression ``{"g": G}`` on
    axis 0: the output units of a convolution or linear layer, the channels of a normalization
    layer or of an element-wise scale. Transposed convolutions (weight axis 0 is the input) do not,
    nor does a module with parameterized submodules: its output is whatever its forward makes of
    theirs, not its own parameter's units (SwiftFormer's attention holds ``w_g``, on the query's
    group, and returns its ``final`` projection, on the residual stream's, of the same size).

    A group that shares a product axis with another group (a head dimension, in
    ``{"prod": [heads, head dim]}``) has no site: a module that carries it plainly (a per-head
    norm of q or k, MViT's pooling of q, k and v) sees the partner group on another axis of its
    output, or folded into the batch, where the two models order it differently, so its rows
    are not samples of the same unit. Such groups are left to weight matching.
    """
    entangled = _entangled_groups(spec)
    sites = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd) or _has_parameterized_children(module):
            continue
        for pname, _ in module.named_parameters(recurse=False):
            exprs = spec.axes.get(f"{name}.{pname}" if name else pname)
            if exprs and exprs[0] is not None and set(exprs[0]) == {"g"} and exprs[0]["g"] not in entangled:
                sites.setdefault(name, exprs[0]["g"])
    return sites


def _has_parameterized_children(module: nn.Module) -> bool:
    return any(True for child in module.children() for _ in child.parameters())


def _entangled_groups(spec: PermutationSpec) -> set:
    """The groups that appear in a ``prod`` expression together with another group."""
    out: set = set()

    def visit(e):
        if not e or "g" in e or "fixed" in e:
            return
        kind, parts = next(iter(e.items()))
        if kind == "prod":
            names = set(walk_groups(e))
            if len(names) > 1:
                out.update(names)
        for part in parts:
            visit(part)

    for exprs in spec.axes.values():
        for e in exprs:
            visit(e)
    return out


class _Stats:
    """Streaming float64 moments of two sites' activations: means, variances, cross products;
    and the mean square of A's round-off (its activations less a float64 run's)."""

    def __init__(self):
        self.n = self.n_noise = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = self.snoise = None

    def add_noise(self, a: torch.Tensor, ref: torch.Tensor) -> None:
        d = (a.double() - ref.double()).pow(2).sum(0)
        self.snoise = d if self.snoise is None else self.snoise + d
        self.n_noise += len(a)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        if self.sab is None:
            z = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
            self.sa, self.sb, self.saa, self.sbb = z.clone(), z.clone(), z.clone(), z.clone()
            self.sab = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
        self.n += len(a)
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab.addmm_(a.T, b)

    def _moments(self, s: torch.Tensor, ss: torch.Tensor) -> tuple:
        """Means, variances, and which units vary (std above 1e-5 of the mean), from sums ``s``, ``ss``."""
        mean = s / self.n
        var = (ss / self.n - mean * mean).clamp_min(0)
        return mean, var, var > 1e-10 * mean * mean + 1e-30

    def correlation(self) -> torch.Tensor:
        """Pearson correlations; a constant unit (too few samples, or dead) is 0 against a varying one
        and ``1 - |c_a - c_b| / (|c_a| + |c_b|)`` against another constant one (1 when equal)."""
        (ma, var_a, live_a), (mb, var_b, live_b) = self._moments(self.sa, self.saa), self._moments(self.sb, self.sbb)
        cov = self.sab / self.n - ma[:, None] * mb[None, :]
        corr = cov / (var_a.sqrt()[:, None] * var_b.sqrt()[None, :]).clamp_min(1e-30)
        corr = torch.where(live_a[:, None] & live_b[None, :], corr, torch.zeros_like(corr))
        const = 1 - (ma[:, None] - mb[None, :]).abs() / (ma.abs()[:, None] + mb.abs()[None, :]).clamp_min(1e-30)
        return torch.where(~live_a[:, None] & ~live_b[None, :], const, corr)

    def uncertainty(self) -> torch.Tensor:
        """Per unit of A, how far round-off can move its correlations: the rms round-off over
        the unit's spread (its mean, for a constant unit), at most 1; 0 where none was measured."""
        ma, var_a, live = self._moments(self.sa, self.saa)
        if self.snoise is None:
            return torch.zeros_like(ma)
        noise = (self.snoise / self.n_noise).sqrt()
        scale = torch.where(live, var_a.sqrt(), ma.abs())
        return torch.where(noise > 0, (noise / scale.clamp_min(1e-300)).clamp_max(1.0), torch.zeros_like(noise))


def _channel_axis(module: nn.Module, out: torch.Tensor, n: int) -> int | None:
    """The axis of ``out`` carrying ``n`` channels (None: no such axis)."""
    axes = [k for k in range(1, out.dim()) if out.shape[k] == n]
    if out.dim() == 1 and out.shape[0] == n:
        return 0
    if len(axes) <= 1:
        return axes[0] if axes else None
    channel_first = isinstance(module, _CHANNEL_FIRST) or type(module).__name__.endswith(("1d", "2d", "3d"))
    return 1 if channel_first and 1 in axes else axes[-1]


def _tied(cost: np.ndarray, p: np.ndarray, rtol: float = 1e-9, unc: np.ndarray | None = None) -> bool:
    """Whether swapping the matches of some two units of the assignment ``p`` leaves its value
    ``Σ_i cost[i, p(i)]`` unchanged (within ``rtol`` of the largest entry), or changes it by no
    more than round-off could: ``unc[i]`` bounds how far round-off moves a cost entry of unit
    ``i`` (of A, and of its match in B), so a swap of ``i`` and ``k``, four entries, is within
    ``4 (unc[i] + unc[k])`` of a tie."""
    if len(p) < 2:
        return False
    x = cost[:, p]  # x[i, k]: unit i given k's match
    v = np.diagonal(x).copy()
    gain = v[:, None] - x
    gain += gain.T  # the loss of swapping the matches of i and k
    if unc is not None:
        gain -= 4 * (unc[:, None] + unc[None, :])
    np.fill_diagonal(gain, np.inf)
    return bool(gain.min() <= rtol * max(1.0, float(np.abs(cost).max())))


@torch.no_grad()
def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches: Iterable, *,
                        progress: bool | None = None, seed: int = 0, process_group=None,
                        kinds: Sequence[str] | None = None):
    """The permutation of ``model_b``'s groups that best correlates its activations with ``model_a``'s.

    Both models run in eval mode on the same batches (their modes are restored). For every
    group, the outputs of the modules that carry it on their channel axis (see
    :func:`activation_sites`) are captured with forward hooks; per site, float64 sums give the
    means, variances and cross-products of the two models' units, so no activation is stored.
    The cost of a group is the sum over its sites of the correlation matrices (a residual-stream
    group pools every layer that writes to it), and one linear assignment per group gives the
    permutation.

    Groups with no such site (for example heads and head dimensions, which only appear inside
    products) are matched by weight matching, the others held at their activation result; so
    is a group whose assignment is tied, some two units swappable at no cost (too few samples:
    on a batch of 2, a layer after global pooling sees 2 values per unit, and every correlation
    is ±1), or at a cost that round-off could produce. Round-off is measured on the first batch:
    a float64 copy of ``model_a`` (made for that batch only, on its device) runs it, and a unit
    whose activations vary by little more than their float32 error (nearly constant units, as
    after a large bias) has correlations that round-off alone can reorder.

    Args:
        spec: the models' spec (``autoperm.infer_spec``).
        model_a, model_b: two models of the architecture; not modified.
        batches: inputs, or tuples whose first element is the input (``(x, y)``), on the models' device.
        progress: show a progress bar (None: only on a terminal, after 2 s).
        seed: the visiting order of the weight-matching fallback.
        process_group: a ``torch.distributed`` process group; each rank passes its own shard of the
            batches (``autoperm.distributed.shard``) and the same models. The sums are
            all-reduced and every rank returns the permutation one process finds on all the
            batches; the round-off estimate is rank 0's first batch (with ``shard``, the first
            batch). A rank holding other models or another spec: ValueError on every rank.
        kinds: continuous symmetry kinds of ``spec.maps`` to match as well; each map is then fitted to
            the cross-covariance of the two models' activations in its space, after the permutation
            (``autoperm.matching.activation_maps``); maps whose space no layer shows are left to weight
            matching's step. None (the default): permutations only.

    Returns:
        ``{group: LongTensor}`` on the CPU; ``apply_permutation(spec, perm, model_b.state_dict())``
        is B aligned to A. With ``kinds``: an ``autoperm.maps.Alignment``;
        ``autoperm.maps.align_state(spec, state_a, state_b, result)`` is B aligned to A.

    >>> import torch, autoperm
    >>> a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoperm.infer_spec(a, torch.randn(1, 4))
    >>> b = autoperm.permute_model_(__import__("copy").deepcopy(a), spec, autoperm.random_permutation(spec, seed=2))
    >>> perm = activation_matching(spec, a, b, [torch.randn(64, 4)])
    >>> torch.equal(perm["0.weight:0"], autoperm.inverse_permutation(autoperm.random_permutation(spec, seed=2))["0.weight:0"])
    True
    """
    if kinds is not None:
        return _with_maps(spec, model_a, model_b, list(batches), kinds, progress=progress, seed=seed,
                          process_group=process_group)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    check_states(spec, state_a=state_a, state_b=state_b)
    check_same(process_group, spec, state_a=state_a, state_b=state_b)
    sites = activation_sites(spec, model_a)
    stats = {name: _Stats() for name in sites}
    captured: dict = {}
    ref = None if is_float64(model_a) or rank(process_group) else float64_model(model_a).eval()  # made before the hooks, which a copy would carry
    modules_a, modules_b = dict(model_a.named_modules()), dict(model_b.named_modules())

    def hook(which, name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor):
                captured[(which, name)] = (module, out)
        return fn

    handles = [modules_a[n].register_forward_hook(hook("a", n)) for n in sites]
    handles += [modules_b[n].register_forward_hook(hook("b", n)) for n in sites]
    modes = {m: m.training for m in (*model_a.modules(), *model_b.modules())}
    model_a.eval()
    model_b.eval()
    if ref is not None:
        ref_modules = dict(ref.named_modules())
        handles += [ref_modules[n].register_forward_hook(hook("r", n)) for n in sites]
        del ref_modules
    seen = 0
    try:
        for batch in tqdm(batches, desc="activation matching", unit="batch", leave=False,
                          disable=(None if progress is None else not progress), delay=2.0 if progress is None else 0.0):
            x = batch_input(batch)
            args = x if isinstance(x, tuple) else (x,)
            model_a(*args)
            model_b(*args)
            if ref is not None:  # round-off of A on the first batch, against a float64 run
                try:
                    ref(*float64_inputs(args))
                except Exception:  # noqa: BLE001 - a model that cannot run in float64: no estimate
                    for name in sites:
                        captured.pop(("r", name), None)
                ref = None
            for name, group in sites.items():
                (mod, a), (_, b) = captured.pop(("a", name), (None, None)), captured.pop(("b", name), (None, None))
                _, r = captured.pop(("r", name), (None, None))
                if a is None or b is None or a.shape != b.shape:
                    continue
                axis = _channel_axis(mod, a, spec.group_sizes[group])
                if axis is None:
                    continue
                n = spec.group_sizes[group]
                stats[name].add(a.movedim(axis, -1).reshape(-1, n), b.movedim(axis, -1).reshape(-1, n))
                if r is not None and r.shape == a.shape:
                    stats[name].add_noise(a.movedim(axis, -1).reshape(-1, n), r.movedim(axis, -1).reshape(-1, n))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if process_group is not None:
        seen = _all_reduce_stats(stats, sites, spec, seen, process_group)
    if not seen:
        raise ValueError("activation_matching needs at least one batch")

    cost: dict = {}
    unc: dict = {}
    for name, group in sites.items():
        if stats[name].n:
            c = stats[name].correlation().cpu().numpy()
            u = stats[name].uncertainty().cpu().numpy()
            cost[group] = c if group not in cost else cost[group] + c
            unc[group] = u if group not in unc else unc[group] + u
    perm = {g: torch.arange(n) for g, n in spec.group_sizes.items()}
    for group, c in list(cost.items()):
        c = np.nan_to_num(c)
        p = solve_numpy(c)
        if _tied(c, p, unc=unc[group]):  # the data cannot tell some units apart: left to the weights
            del cost[group]
        else:
            perm[group] = torch.from_numpy(p)
    for m in spec.modules:  # a module's own groups: on the weights, against the module its slot receives
        for g in (g for f in m.local for g in f):
            cost.pop(g, None)
    rest = [g for g in spec.group_sizes if g not in cost]
    if rest:
        perm = descend_groups(spec, state_a, state_b, perm, set(rest), seed=seed, progress=progress)
    perm = with_blocks(expand_rows(spec, perm), spec)
    return perm if process_group is None else with_blocks(broadcast_permutation(perm, process_group), spec)


def _with_maps(spec, model_a, model_b, batches: list, kinds, **kw):
    """Activation matching of the permutations, then of the maps of ``kinds`` (see ``activation_matching``)."""
    from ..maps.align import Alignment
    from ..maps.element import identity_transform
    from .activation_maps import activation_transform, permuted_copy
    from .maps import check_kinds, refine_maps, used_maps
    from .weight import _check_map_keys

    kinds = check_kinds(kinds)
    if kw.get("process_group") is not None:
        raise ValueError("activation matching with continuous symmetry kinds does not run over a process group")
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    _check_map_keys(spec, kinds, state_a, state_b)
    perm = activation_matching(spec, model_a, model_b, batches, **kw) if spec.group_sizes else {}
    maps = used_maps(spec, kinds)
    estimated, missing = activation_transform(maps, model_a, permuted_copy(spec, perm, model_b), batches)
    transform = identity_transform([m for m, _ in maps])
    transform.update(estimated)
    if missing:
        transform = refine_maps(spec, maps, state_a, state_b, perm, transform, {m.name for m, _ in missing})
    return Alignment(perm, transform, kinds)


def _all_reduce_stats(stats: dict, sites: dict, spec: PermutationSpec, seen: int, group) -> int:
    """Sum every site's statistics over the ranks of ``group`` (in place); returns the batches seen by all."""
    counts = torch.tensor([seen] + [v for s in stats.values() for v in (s.n, s.n_noise)], dtype=torch.float64)
    tensors = [counts]
    for name, s in stats.items():
        n = spec.group_sizes[sites[name]]
        if s.sab is None:
            z = torch.zeros(n, dtype=torch.float64)
            s.sa, s.sb, s.saa, s.sbb, s.sab = z.clone(), z.clone(), z.clone(), z.clone(), torch.zeros(n, n, dtype=torch.float64)
        if s.snoise is None:
            s.snoise = torch.zeros(n, dtype=torch.float64, device=s.sa.device)
        tensors += [s.sa, s.sb, s.saa, s.sbb, s.sab, s.snoise]
    all_reduce_(tensors, group)
    values = [int(v) for v in counts.tolist()]
    for k, s in enumerate(stats.values()):
        s.n, s.n_noise = values[1 + 2 * k], values[2 + 2 * k]
        if not s.n_noise:
            s.snoise = None
    return values[0]
