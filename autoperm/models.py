"""Resolve a MODEL argument to a module and example inputs: a timm name, or ``package.module:factory``.

- A timm name (``resnet18``, ``vit_small_patch16_224``, ``test_resnet``) builds
  ``timm.create_model(name, pretrained=False, **kwargs)``; the example input is a batch of
  random images of the model's ``pretrained_cfg["input_size"]``. Nothing is downloaded.
- ``package.module:factory`` (or ``path/to/file.py:factory``) imports the module (the current
  folder is on the import path) and calls ``factory(**kwargs)``. The factory returns a module,
  or a ``(module, example_inputs)`` pair for models whose inputs are not one float tensor
  (token ids, several inputs). Otherwise ``input_shape`` gives the example input's shape.

``input_shape`` always wins over the defaults: it is the shape of one example, without the
batch axis; a batch of ``batch_size`` random examples (standard normal, fixed seed) is built.
The model is returned in eval mode.

>>> m = resolve_model("torch.nn:Identity", input_shape=(4,))
>>> type(m.module).__name__, tuple(m.example_inputs[0].shape)
('Identity', (2, 4))
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ._float64 import floating_dtype, inputs_in

__all__ = ["ResolvedModel", "ModelError", "resolve_model", "parse_shape", "parse_model_args", "random_inputs",
           "random_like"]


class ModelError(ValueError):
    """A MODEL argument that names no model, or a model without usable example inputs."""


@dataclass
class ResolvedModel:
    """A model (eval mode), its example inputs (a tuple of tensors) and where it came from."""

    name: str
    module: torch.nn.Module
    example_inputs: tuple
    source: str  # "timm" or "factory"

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in self.example_inputs if isinstance(t, torch.Tensor)]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"3,224,224"`` or ``"3x224x224"`` → ``(3, 224, 224)``.

    >>> parse_shape("3x32x32"), parse_shape("16")
    ((3, 32, 32), (16,))
    """
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelError(f"bad shape {text!r}: expected integers like 3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise ModelError(f"bad shape {text!r}: expected positive integers like 3,224,224")
    return shape


def parse_model_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["num_classes=10", "drop_rate=0.1", "act='relu'"]`` → keyword arguments (Python literals, else strings).

    >>> parse_model_args(["num_classes=10", "global_pool=avg", "pretrained_strict=False"])
    {'num_classes': 10, 'global_pool': 'avg', 'pretrained_strict': False}
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ModelError(f"bad model argument {item!r}: expected NAME=VALUE, e.g. num_classes=10")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def random_inputs(shapes: Sequence[Sequence[int]], batch_size: int = 2, seed: int = 0) -> tuple:
    """One standard-normal float tensor per shape, each with a leading batch axis of ``batch_size``."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((batch_size, *s), generator=gen) for s in shapes)


def random_like(example: Sequence[torch.Tensor], batch_size: int | None = None, seed: int = 0):
    """Random inputs shaped like ``example`` (a tuple of tensors), with ``batch_size`` rows if given.

    Float tensors are standard normal; integer tensors (token ids) uniform between the example's
    minimum and maximum; constant integer tensors (all-ones attention masks) are kept constant.
    Returns a tensor for a one-input model, else a tuple.

    >>> ids = torch.tensor([[3, 7, 5]]); x = random_like((torch.zeros(1, 4), ids), batch_size=2)
    >>> x[0].shape, x[1].shape, bool(((x[1] >= 3) & (x[1] <= 7)).all())
    (torch.Size([2, 4]), torch.Size([2, 3]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in example:
        shape = (batch_size if batch_size is not None else t.shape[0], *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=t.dtype))
        elif t.numel() and int(t.min()) != int(t.max()):
            out.append(torch.randint(int(t.min()), int(t.max()) + 1, shape, generator=gen, dtype=t.dtype))
        else:
            out.append(t.reshape(-1)[:1].expand(shape).clone() if t.numel() else t.new_zeros(shape))
    return out[0] if len(out) == 1 else tuple(out)


def resolve_model(name: str, input_shape: Sequence[int] | Sequence[Sequence[int]] | None = None,
                  model_args: Mapping[str, Any] | None = None, batch_size: int = 2, seed: int = 0) -> ResolvedModel:
    """Build the model a MODEL argument names, with example inputs; see the module docstring.

    Args:
        name: a timm model name, or ``module:factory`` / ``file.py:factory``.
        input_shape: one example's shape without the batch axis (or a list of shapes, one per
            input); overrides the timm config and a factory's own example inputs.
        model_args: keyword arguments for ``timm.create_model`` or the factory
            (e.g. ``num_classes=10`` to match a fine-tuned checkpoint).
        batch_size, seed: of the random example inputs.

    Raises:
        ModelError: unknown timm name (with close names), a factory that cannot be imported or
            returns no module, or no way to make example inputs.
    """
    kwargs = dict(model_args or {})
    shapes = None
    if input_shape is not None:
        seq = list(input_shape)
        shapes = [tuple(s) for s in seq] if seq and isinstance(seq[0], (tuple, list)) else [tuple(seq)]
    if ":" in name:
        model, example, source = *_from_factory(name, kwargs), "factory"
    else:
        model, example, source = _from_timm(name, kwargs), None, "timm"
    model.eval()
    if shapes is None and example is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        if "input_size" not in cfg:
            raise ModelError(f"{name}: no example input shape known; pass --input-shape (one example, "
                             "without the batch axis, e.g. 3,224,224)")
        shapes = [tuple(cfg["input_size"])]
    if shapes is not None:  # random inputs in the model's dtype (a bfloat16 model takes bfloat16)
        example = inputs_in(random_inputs(shapes, batch_size, seed), floating_dtype(model))
    elif not isinstance(example, tuple):
        example = tuple(example) if isinstance(example, list) else (example,)
    return ResolvedModel(name, model, example, source)


def _from_timm(name: str, kwargs: dict) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8] or timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ModelError(f"{name!r} is not a timm model name, nor module:factory{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelError(f"timm.create_model({name!r}, **{kwargs}) failed: {e}") from e


def _from_factory(name: str, kwargs: dict):
    target, _, attr = name.rpartition(":")
    if not target or not attr:
        raise ModelError(f"bad MODEL {name!r}: expected package.module:factory")
    mod = _import(target)
    fn = mod
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ModelError(f"{target} has no attribute {attr!r}")
        fn = getattr(fn, part)
    out = fn(**kwargs) if callable(fn) and not isinstance(fn, torch.nn.Module) else fn
    example = None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        out, example = out
    if not isinstance(out, torch.nn.Module):
        raise ModelError(f"{name} returned a {type(out).__name__}, not a torch.nn.Module "
                         "(nor a (module, example_inputs) pair)")
    return out, example


def _import(target: str):
    if target.endswith(".py") or os.sep in target:
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise ModelError(f"no such file: {target}")
        mod_name = "_autoperm_user_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
        return mod
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # console scripts do not put the current folder on the path; python -m does
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ModelError(f"cannot import {target!r}: {e}") from e
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
