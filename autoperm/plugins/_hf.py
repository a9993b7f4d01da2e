"""Hugging Face transformers models: example inputs for tracing, and loading a saved model folder."""
from __future__ import annotations

import os

import torch

from .._float64 import floating_dtype

__all__ = ["hf_example_inputs", "load_hf_model", "is_hf_model", "prepare_for_trace"]


def is_hf_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "save_pretrained")


def hf_example_inputs(model: torch.nn.Module, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> tuple:
    """Example inputs for a transformers model from its config: token ids for text, pixels for vision.

    Text models get ``input_ids`` of ``seq_len`` tokens (within the position limit); vision models
    ``pixel_values`` of the configured image size, in the model's dtype. Pass your own inputs for
    anything else.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    if getattr(cfg, "vocab_size", None) and not hasattr(cfg, "image_size"):
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or seq_len
        return (torch.randint(0, cfg.vocab_size, (batch_size, min(seq_len, limit)), generator=gen),)
    if hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, (tuple, list)) else (cfg.image_size, cfg.image_size)
        pixels = torch.randn(batch_size, getattr(cfg, "num_channels", 3), *size, generator=gen)
        return (pixels.to(floating_dtype(model)),)  # a bfloat16 model takes bfloat16 pixels
    raise ValueError(f"cannot make example inputs for {type(model).__name__}; pass example_inputs")


def prepare_for_trace(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off the key/value cache, whose cache object torch.export cannot return."""
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False
    return model.eval()


def load_hf_model(path: str) -> torch.nn.Module:
    """Load a saved transformers model folder (``config.json`` + weights) with the class its config names.

    The weights keep the dtype they are stored in (``dtype="auto"``): a bfloat16 checkpoint loads,
    aligns and saves as bfloat16. Checks run on float32 copies (:mod:`autoperm.equivalence`).
    """
    import transformers

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: not a transformers model folder (no config.json)")
    cfg = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    return prepare_for_trace(cls.from_pretrained(path, **_stored_dtype_kwarg(transformers.__version__)))


def _stored_dtype_kwarg(version: str) -> dict:
    """``from_pretrained``'s keyword for "the dtype the weights are stored in": ``dtype`` since 4.56.

    >>> _stored_dtype_kwarg("4.40.0"), _stored_dtype_kwarg("5.0.0")
    ({'torch_dtype': 'auto'}, {'dtype': 'auto'})
    """
    major, minor = (int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": "auto"}
