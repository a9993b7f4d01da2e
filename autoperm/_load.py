"""Load a state dict so that nothing computed from the old weights survives."""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["load_state_", "drop_weight_caches_", "keep_metadata"]


def load_state_(module: torch.nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> torch.nn.Module:
    """``module.load_state_dict(state)``, then drop caches derived from the old weights; returns ``module``.

    Some modules cache values computed from their parameters (timm's LeViT and EfficientViT keep
    ``attention_bias_cache`` after their first eval-mode forward) and clear them only in
    ``train()``. So every module's ``train()`` is called once, and each module's own mode is put
    back as it was: a permuted, merged or interpolated state dict is then what the next forward uses.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).eval()
    >>> net[1].train()
    Dropout(p=0.5, inplace=False)
    >>> _ = load_state_(net, net.state_dict())
    >>> net.training, net[1].training
    (False, True)
    """
    module.load_state_dict(state, strict=strict)
    return drop_weight_caches_(module)


def keep_metadata(out: dict, like: Mapping) -> dict:
    """``out`` carrying ``like``'s ``_metadata`` (module versions) when it has one.

    ``Module.state_dict()`` records each module's version there, and some modules need it to load
    (torchvision's MNASNet refuses a state dict without it), so a new state dict made from one
    keeps it.

    >>> sd = torch.nn.Linear(1, 1).state_dict()
    >>> keep_metadata({k: v * 2 for k, v in sd.items()}, sd)._metadata == sd._metadata
    True
    """
    meta = getattr(like, "_metadata", None)
    if meta is None:
        return out
    from collections import OrderedDict

    out = OrderedDict(out)
    out._metadata = type(meta)(meta)
    return out


def drop_weight_caches_(module: torch.nn.Module) -> torch.nn.Module:
    """Call every module's ``train()`` once (caches derived from weights are cleared there), keeping each mode."""
    modes = {m: m.training for m in module.modules()}
    module.train(module.training)
    for m, mode in modes.items():
        m.training = mode
    return module
