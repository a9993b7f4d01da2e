"""A transformers folder as autoperm sees it: the model built on the meta device from ``config.json``
(no memory for weights), its spec, and the weight files checked against it key by key."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from ..io import CheckpointError
from ._files import LazyState, WeightFiles

__all__ = ["FolderModel", "is_model_folder", "open_folder", "meta_model", "tied_aliases"]


def is_model_folder(path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a transformers model folder)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, "config.json"))


def meta_model(folder: str) -> torch.nn.Module:
    """The model ``folder/config.json`` describes, built on the meta device (its weights take no memory)."""
    import transformers

    if not is_model_folder(folder):
        raise CheckpointError(f"{folder}: not a transformers model folder (no config.json)")
    try:
        cfg = transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {str(e).splitlines()[0]}") from e
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return model.eval()


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """``{key: first key}`` for state-dict keys that share a tensor with an earlier key (tied weights)."""
    first: dict = {}
    out = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, p in tensors:
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    keys = model.state_dict().keys()
    return {k: v for k, v in out.items() if k in keys and v in keys}


@dataclass
class FolderModel:
    """A checked folder: ``model`` (meta device), ``files`` (its weights), ``aliases`` (tied keys the
    files leave out, to the key that holds them), ``ignored`` (file keys the model does not use)."""

    folder: str
    model: torch.nn.Module
    files: WeightFiles
    aliases: dict
    ignored: list = field(default_factory=list)

    def state(self, cache_bytes: int = 1 << 30) -> LazyState:
        """A lazy state dict with every key of the model (tied keys included)."""
        return LazyState(self.files, self.aliases, cache_bytes)

    def example_inputs(self, seed: int = 0) -> tuple:
        from ..plugins._hf import hf_example_inputs

        return hf_example_inputs(self.model, seed=seed)

    def spec(self, example_inputs=None):
        """The spec of the model, inferred on the meta device."""
        from .. import infer_spec

        return infer_spec(self.model, example_inputs if example_inputs is not None else self.example_inputs())


def open_folder(folder: str, model: torch.nn.Module | None = None) -> FolderModel:
    """Read ``folder``'s config and weight-file headers and check every key and shape against the model.

    ``model`` (meta device) defaults to the one ``folder/config.json`` describes; pass another
    folder's to check that this folder holds the same architecture. Raises
    :class:`CheckpointError` naming the file and key of the first problem; no tensor data is read.
    """
    folder = os.fspath(folder)
    if model is None:
        model = meta_model(folder)
    files = WeightFiles(folder)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    aliases = {}
    for k, v in tied_aliases(model).items():  # the files hold one of each tied pair, either one
        if k not in files.infos:
            aliases[k] = v
        elif v not in files.infos:
            aliases[v] = k
    missing = [k for k in want if k not in files.infos and k not in aliases]
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    extra = [k for k in files.infos if k not in want]
    unexpected = [k for k in extra if not any(p.search(k) for p in ignore)]
    where = os.path.join(folder, "config.json")
    if missing:
        raise CheckpointError(f"{folder}: no tensor {missing[0]} in any weight file, which the model of {where} has"
                              + (f" ({len(missing) - 1} more keys missing)" if len(missing) > 1 else ""))
    if unexpected:
        k = unexpected[0]
        raise CheckpointError(f"{os.path.join(folder, files.infos[k].file)}: {k} is not a key of the model of {where}"
                              + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, shape in want.items():
        info = files.infos[aliases.get(k, k)]
        if info.shape != shape:
            raise CheckpointError(f"{os.path.join(folder, info.file)}: {aliases.get(k, k)} has shape {info.shape}, "
                                  f"the model of {where} expects {shape}")
    return FolderModel(folder, model, files, aliases, extra)
