"""Statistics repair for interpolated models: BatchNorm reset and REPAIR.

An interpolated model's BatchNorm running statistics are the interpolated statistics of the two
endpoints, not the statistics of the interpolated model's own activations; evaluated as is, a
BatchNorm network looks far worse than it is. :func:`reset_bn_stats` recomputes them on data.

REPAIR (Jordan et al. 2022, "REPAIR: REnormalizing Permuted Activations for Interpolation
Repair") goes further and works without BatchNorm: the activations of an interpolated network
lose variance ("variance collapse"), so each chosen layer's output channels are rescaled and
shifted until their mean and standard deviation are the interpolation of the endpoints' ones:
``goal = (1 − λ)·stat_A + λ·stat_B``. :class:`Repair` measures the endpoints once and then
repairs any interpolated model by folding the correction into that layer's weight and bias.

Batches are iterables of inputs, or of tuples whose first element is the input (``(x, y)``).
"""
from __future__ import annotations

import copy
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .._load import load_state_
from ..distributed import all_reduce_

__all__ = ["reset_bn_stats", "has_batchnorm", "Repair", "repair_points", "as_reiterable"]

_BN = nn.modules.batchnorm._BatchNorm
_NORMS = (_BN, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _input(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def as_reiterable(batches: Iterable) -> Iterable:
    """``batches`` itself if it can be iterated again (a list, a tuple); a generator becomes a list."""
    return list(batches) if iter(batches) is batches else batches


def has_batchnorm(model: nn.Module) -> bool:
    """True if ``model`` has a BatchNorm layer that tracks running statistics."""
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable, process_group=None) -> nn.Module:
    """Recompute every BatchNorm layer's running mean and variance on ``batches``, in place.

    Each BatchNorm layer's statistics are reset and re-estimated as the plain average over the
    batches (momentum ``None``), with the rest of the model in eval mode (dropout off). Weights
    and biases are not touched; ``num_batches_tracked`` ends at the number of batches. Modes
    and momenta are restored afterwards. A model without BatchNorm is returned unchanged.

    With a ``torch.distributed`` ``process_group``, each rank passes its own shard of the batches
    (``autoperm.distributed.shard``): each layer's statistics, weighted by its batch count, are
    summed over the ranks, and every rank ends with the average over all the batches, as one
    process would find on them.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> _ = reset_bn_stats(net, [torch.randn(64, 3) * 5 + 2])
    >>> bool(net[1].running_var.mean() > 1.5)   # the fresh statistics, not the initial ones
    True
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return model
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    seen = 0
    for batch in batches:
        model(_input(batch))
        seen += 1
    if process_group is not None:
        seen = _all_reduce_bn(bns, seen, process_group)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    for m, mode in modes.items():
        m.training = mode
    if seen == 0:
        raise ValueError("reset_bn_stats got no batches")
    return model


def _all_reduce_bn(bns: Sequence[nn.Module], seen: int, group) -> int:
    """Average the layers' running statistics over the ranks, weighted by their batch counts; returns
    the batches seen by all."""
    sums = [torch.tensor([float(seen)], dtype=torch.float64)]
    for m in bns:
        count = float(m.num_batches_tracked)
        sums += [m.running_mean.double() * count, m.running_var.double() * count,
                 torch.tensor([count], dtype=torch.float64, device=m.running_mean.device)]
    all_reduce_(sums, group)
    for k, m in enumerate(bns):
        mean, var, count = sums[1 + 3 * k: 4 + 3 * k]
        if count.item():
            m.running_mean.copy_(mean / count)
            m.running_var.copy_(var / count)
        m.num_batches_tracked.fill_(int(count.item()))
    return int(sums[0].item())


# -- REPAIR -------------------------------------------------------------------------------

def _channel_dim(module: nn.Module) -> int:
    """Where a module's output channels are: dim 1 for convs and 2-D norms, the last dim otherwise."""
    if isinstance(module, nn.Linear) or (isinstance(module, nn.LayerNorm) and "2d" not in type(module).__name__):
        return -1
    return 1


def _foldable(module: nn.Module) -> bool:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor) and b.dim() == 1
            and w.shape[0] == b.shape[0])


def repair_points(model: nn.Module, example_input: torch.Tensor) -> list[str]:
    """The layers REPAIR rescales by default, in execution order.

    Every normalization layer with an affine weight and bias (BatchNorm, GroupNorm, LayerNorm)
    and every Linear or Conv layer with a bias, except the last Linear/Conv to run: that is the
    classifier head, whose outputs are logits, not features.
    """
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (*_NORMS, nn.Linear, *_CONVS)) and _foldable(m):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(order))
    modules = dict(model.named_modules())
    linear = [n for n in order if isinstance(modules[n], (nn.Linear, *_CONVS))]
    if linear:
        order.remove(linear[-1])
    return order


class _Moments:
    """Per-channel running sums of an output, in float64."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, out: torch.Tensor, dim: int) -> None:
        x = out.detach().movedim(dim, -1).reshape(-1, out.shape[dim]).double()
        self.n += x.shape[0]
        self.s = self.s + x.sum(0)
        self.ss = self.ss + (x * x).sum(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0)
        return mean, var.sqrt()


def _measure(model: nn.Module, names: Sequence[str], batches: Iterable, renorm=None, process_group=None) -> dict:
    """Per-channel mean and std of each named module's output over ``batches`` (model in eval mode).

    With ``renorm`` (name → (goal mean, goal std)), each output is also replaced, batch by batch,
    by its batch-normalised value rescaled to the goal, so later layers see repaired inputs.
    With a ``process_group``, the sums are taken over the ranks' batches.
    """
    modules = dict(model.named_modules())
    moments = {n: _Moments() for n in names}
    hooks = []
    for n in names:
        dim = _channel_dim(modules[n])

        def hook(mod, inp, out, n=n, dim=dim):
            moments[n].add(out, dim)
            if renorm is None:
                return None
            shape = [1] * out.dim()
            shape[dim] = -1
            red = [d for d in range(out.dim()) if d != dim % out.dim()]
            mu, sd = out.mean(red, keepdim=True), out.var(red, keepdim=True, unbiased=False).add(1e-5).sqrt()
            g_mean, g_std = renorm[n]
            return (out - mu) / sd * g_std.to(out).view(shape) + g_mean.to(out).view(shape)

        hooks.append(modules[n].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(_input(batch))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    if process_group is not None:
        counts = torch.tensor([float(m.n) for m in moments.values()], dtype=torch.float64)
        for n, m in moments.items():
            if not m.n:
                m.s, m.ss = (torch.zeros(modules[n].bias.shape[0], dtype=torch.float64, device=modules[n].bias.device)
                             for _ in range(2))
        all_reduce_([counts] + [t for m in moments.values() for t in (m.s, m.ss)], process_group)
        for m, c in zip(moments.values(), counts.tolist()):
            m.n = int(c)
    if any(m.n == 0 for m in moments.values()):
        raise ValueError("REPAIR: some layers never ran on the batches (or no batches were given)")
    return {n: m.mean_std() for n, m in moments.items()}


class Repair:
    """REPAIR: rescale an interpolated model's channels to the interpolated endpoint statistics.

    Construction measures, on ``batches``, the per-channel mean and standard deviation of each
    repaired layer's output in model A and in model B (B already aligned to A). Calling
    ``repair(model, lam)`` on a model that holds the λ-interpolated weights then

    1. runs ``batches`` through it once, replacing each repaired layer's output by its batch-
       normalised value scaled to the goal ``(1−λ)·stat_A + λ·stat_B``, so downstream layers see
       repaired inputs while each layer's own raw statistics are measured (as the REPAIR
       notebooks do with a BatchNorm in train mode);
    2. folds ``out ← (out − mean)·goal_std/std + goal_mean`` into the layer's weight and bias.

    The model is changed in place and returned; it remains an ordinary model of the same class.

    Args:
        model: any model of the architecture (only its structure is used; it is not modified).
        state_a, state_b: the endpoint state dicts.
        batches: a re-iterable of input batches (a generator is turned into a list).
        modules: names of the layers to repair; default :func:`repair_points`.
        eps: added to the measured standard deviation before dividing by it.
        process_group: a ``torch.distributed`` process group; each rank passes its own shard of the
            batches, the statistics (here and at every call) are summed over the ranks.

    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> a, b = net.state_dict(), {k: v + 0.1 for k, v in net.state_dict().items()}
    >>> rep = Repair(net, a, b, [torch.randn(32, 4)])
    >>> rep.modules
    ['0']
    """

    def __init__(self, model: nn.Module, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                 batches: Iterable, modules: Sequence[str] | None = None, eps: float = 1e-5, process_group=None):
        self.batches = as_reiterable(batches)
        work = copy.deepcopy(model)
        if modules is None:
            modules = repair_points(work, _input(next(iter(self.batches))))
        named = dict(work.named_modules())
        for n in modules:
            if n not in named or not _foldable(named[n]):
                raise ValueError(f"REPAIR cannot rescale {n!r}: it needs a module with a per-channel weight and bias")
        self.modules = list(modules)
        self.eps, self.group = eps, process_group
        load_state_(work, state_a)
        self.stats_a = _measure(work, self.modules, self.batches, process_group=process_group)
        load_state_(work, state_b)
        self.stats_b = _measure(work, self.modules, self.batches, process_group=process_group)

    def goal(self, lam: float) -> dict:
        """Per layer, the goal ``(mean, std)`` at ``lam``."""
        return {n: ((1 - lam) * self.stats_a[n][0] + lam * self.stats_b[n][0],
                    (1 - lam) * self.stats_a[n][1] + lam * self.stats_b[n][1]) for n in self.modules}

    @torch.no_grad()
    def __call__(self, model: nn.Module, lam: float) -> nn.Module:
        goal = self.goal(lam)
        measured = _measure(model, self.modules, self.batches, renorm=goal, process_group=self.group)
        named = dict(model.named_modules())
        for n in self.modules:
            mod, (mean, std), (g_mean, g_std) = named[n], measured[n], goal[n]
            scale = g_std / (std + self.eps)
            w = mod.weight
            w.mul_(scale.to(w).view(-1, *[1] * (w.dim() - 1)))
            mod.bias.copy_(((mod.bias.double() - mean) * scale + g_mean).to(mod.bias))
        return model
