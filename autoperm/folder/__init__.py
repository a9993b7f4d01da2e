"""Models as transformers folders, larger than memory: the spec inferred on the meta device, weights
read one tensor at a time (``LazyState``), weight matching on demand (``stream_weight_matching``) and
an atomic, resumable shard-by-shard write of the aligned copy (``write_permuted_folder``).

>>> is_model_folder("/nonexistent")
False
"""
from ._files import LazyState, WeightFiles
from ._model import FolderModel, is_model_folder, meta_model, open_folder
from .align import align_folders, verify_folder
from .match import stream_weight_matching
from .write import write_permuted_folder

__all__ = ["is_model_folder", "open_folder", "meta_model", "FolderModel", "WeightFiles", "LazyState",
           "stream_weight_matching", "write_permuted_folder", "align_folders", "verify_folder"]
