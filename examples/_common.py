"""Shared pieces of the example experiments: models, a training loop, matching, reporting.

Every experiment trains its models from fixed seeds on offline data (``autoperm.data``), so a
rerun gives the same numbers on the same machine (up to float non-determinism across thread
counts). Trained state dicts are cached under ``<out>/cache`` so that a second run skips training.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Mapping

import torch
from torch import nn

import autoperm
from autoperm.barrier import evaluator, interpolation_curve
from autoperm.data import Dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(description: str, default_out: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=os.path.join(REPO, "out", default_out), help="where plots and JSON go")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--no-cache", action="store_true", help="retrain instead of reading <out>/cache")
    if extra:
        extra(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    return args


def mlp(in_dim: int, widths, num_classes: int = 10) -> nn.Sequential:
    """Linear → ReLU → ... → Linear; ``widths`` are the hidden layer sizes. Input flattened."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_dim
    for w in widths:
        layers += [nn.Linear(d, w), nn.ReLU()]
        d = w
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def train(model: nn.Module, data: Dataset, *, epochs: int, lr: float = 1e-3, batch_size: int = 128, seed: int = 0,
          weight_decay: float = 0.0, optimizer: str = "adam", cache: str | None = None, log: bool = True) -> nn.Module:
    """Train ``model`` in place on ``data``'s train split with cross-entropy; the batch order depends on ``seed``.

    With ``cache`` (a file path), load the state from it if it exists, else train and save it there.
    """
    if cache and os.path.exists(cache):
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval()
    t0 = time.time()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = None
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
        steps = epochs * -(-len(data.x_train) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.25)
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches("train", batch_size, shuffle=True, seed=seed * 100003 + epoch):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()
    model.eval()
    if log:
        ev = evaluator(data)(model)
        print(f"  trained seed {seed}: {epochs} epochs in {time.time() - t0:.1f} s, "
              f"train loss {ev['train_loss']:.3f} acc {ev['train_acc']:.3f}, "
              f"test loss {ev['test_loss']:.3f} acc {ev['test_acc']:.3f}", flush=True)
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model


def cache_path(args, name: str) -> str | None:
    return None if args.no_cache else os.path.join(args.out, "cache", name + ".pt")


def train_batches(data: Dataset, batch_size: int = 500, limit: int | None = None) -> list:
    """Fixed (unshuffled) training batches: for activation matching, BN reset and REPAIR."""
    return list(data.batches("train", batch_size, limit=limit))


def timed(fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    return out, time.time() - t0


def align_all(spec, model_a: nn.Module, model_b: nn.Module, methods, batches, *, ste_steps: int = 300,
              ste_lr: float = 1e-3, seed: int = 0) -> dict:
    """``{label: (aligned state of B, seconds)}`` for ``"naive"`` and each requested matcher.

    Labels: ``"weight"`` (weight matching, one visiting order), ``"weight5"`` (best of 5 orders),
    ``"activation"``, ``"ste"`` (straight-through).
    """
    sa, sb = model_a.state_dict(), model_b.state_dict()
    out = {"naive": (sb, 0.0)}
    for m in methods:
        if m in ("weight", "weight5"):
            perm, sec = timed(autoperm.weight_matching, spec, sa, sb, seed=seed, restarts=5 if m == "weight5" else 1)
        elif m == "activation":
            perm, sec = timed(autoperm.activation_matching, spec, model_a, model_b, batches)
        elif m == "ste":
            perm, sec = timed(autoperm.ste_matching, spec, model_a, model_b, batches, nn.functional.cross_entropy,
                              steps=ste_steps, lr=ste_lr, seed=seed)
        else:
            raise ValueError(m)
        out[m] = (autoperm.apply_permutation(spec, perm, sb), sec)
    return out


def curves_for(model: nn.Module, state_a, aligned: Mapping[str, tuple], evaluate, **kw) -> dict:
    """One interpolation curve per aligned B (``align_all``'s result)."""
    return {label: interpolation_curve(model, state_a, sb, evaluate, **kw) for label, (sb, _) in aligned.items()}


def save_json(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    return path
