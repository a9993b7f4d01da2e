"""A fusion_bench algorithm that aligns a pool of models before any merging method runs.

fusion_bench has 40+ merging methods and no alignment stage. ``AutopermAlignment.run(modelpool)``
infers the permutation spec of the pool's first model, aligns every other model to it and
returns a new ``BaseModelPool`` of aligned models under the same names, ready for the next
algorithm; with ``merge=`` it runs that algorithm on the aligned pool and returns its result.

In Python::

    from fusion_bench.method import SimpleAverageAlgorithm
    from autoperm.plugins.fusion_bench import AutopermAlignment

    merged = AutopermAlignment(merge=SimpleAverageAlgorithm()).run({"a": model_a, "b": model_b})

In a fusion_bench YAML config (``method:``)::

    _target_: autoperm.plugins.fusion_bench.AutopermAlignment
    method: weight            # weight | activation | ste
    merge:
      _target_: fusion_bench.method.SimpleAverageAlgorithm

Special models of the pool (``_pretrained_``, ``_merged_``) are passed on unchanged and are not
aligned. Models are traced on ``example_inputs``, else random inputs of ``input_shape``, else the
model's timm or transformers config. Importing this module needs ``fusion-bench`` installed.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch

try:
    from fusion_bench import BaseAlgorithm, BaseModelPool, auto_register_config
except ImportError as e:  # pragma: no cover - exercised only without fusion_bench
    raise ImportError("autoperm.plugins.fusion_bench needs fusion_bench: pip install fusion-bench") from e

from .. import infer_spec
from .._float64 import floating_dtype, inputs_in
from .._load import load_state_
from ..equivalence import same_function
from ..models import random_inputs, random_like
from ._align import align_states
from ._hf import hf_example_inputs, is_hf_model, prepare_for_trace

__all__ = ["AutopermAlignment"]

log = logging.getLogger(__name__)


@auto_register_config
class AutopermAlignment(BaseAlgorithm):
    """Align every model of a fusion_bench pool to its first model (autoperm's inferred symmetries).

    Args:
        method: ``"weight"`` (no data), ``"activation"`` or ``"ste"`` (need ``batches``, or random
            inputs with ``random_batches``).
        input_shape: one example's input shape without the batch axis, for tracing and random batches.
        merge: a fusion_bench algorithm (or its config) to run on the aligned pool; its result is
            returned instead of the pool.
        random_batches: for activation/ste matching without ``batches``: this many batches of
            random inputs shaped like the example inputs.
        seed: for the matcher and random inputs.
        matcher_options: extra keyword arguments for the matcher (e.g. ``max_iter``).
        verify: check that every aligned model computes what its source computes on the example
            inputs (on float32 copies of bfloat16 and float16 models; :mod:`autoperm.equivalence`)
            and raise RuntimeError, naming the dtype, tolerance and round-off floor, when one does not.

    After ``run``, ``self.spec`` is the spec and ``self.permutations`` maps each model name to the
    permutation applied to it.
    """

    def __init__(self, method: str = "weight", input_shape: Sequence[int] | None = None, merge: Any = None,
                 random_batches: int = 8, seed: int = 0, matcher_options: dict | None = None, verify: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.example_inputs = None
        self.batches = None  # inputs for activation/ste matching: tensors, or tuples for several inputs
        self.labels = None  # one target tensor per batch, for ste (default: model A's predictions)
        self.spec = None
        self.permutations: dict = {}

    @torch.no_grad()
    def run(self, modelpool):
        """Return the aligned pool (or ``merge.run`` of it); models are copies, the input pool is untouched."""
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        names = list(modelpool.model_names)
        if not names:
            raise ValueError("the model pool has no models to align")
        models = [modelpool.load_model(n) for n in names]
        ref = models[0]
        example = self._example_inputs(ref)
        self.spec = infer_spec(ref, example)
        log.info("autoperm: %d groups, %d units; aligning %s to %s", len(self.spec.group_sizes),
                 self.spec.num_units, names[1:], names[0])
        inputs = self.batches
        if self.method != "weight" and inputs is None:
            inputs = [random_like(example, seed=s + self.seed) for s in range(self.random_batches)]
        options = {"seed": self.seed, **(self.matcher_options or {})}
        aligned, perms = align_states(self.spec, [m.state_dict() for m in models], self.method, model=ref,
                                      inputs=inputs, labels=self.labels, **options)
        if self.verify:
            self._verify(names, models, aligned, example)
        out = {}
        for name, model, state in zip(names, models, aligned, strict=True):
            m = copy.deepcopy(model)  # in the stored dtype: unmoved weights stay bit for bit
            load_state_(m, state)
            out[name] = m
        for name in modelpool.all_model_names:
            if name not in out:  # _pretrained_ and friends, unchanged
                out[name] = modelpool.load_model(name)
        self.permutations = dict(zip(names, perms, strict=True))
        pool = BaseModelPool(out)
        merge = self.merge
        if merge is None:
            return pool
        if not hasattr(merge, "run"):
            from fusion_bench.utils import instantiate

            merge = instantiate(merge)
        return merge.run(pool)

    @staticmethod
    def _verify(names, models, aligned, example) -> None:
        """Each aligned model must compute what its source computes (float32 copies of bfloat16/float16 models)."""
        for name, model, state in zip(names[1:], models[1:], aligned[1:], strict=True):
            verdict = same_function(model, model.state_dict(), state, example)
            if not verdict.ok:
                raise RuntimeError(f"aligned model {name!r} does not compute what the original computes ({verdict}); "
                                   "a bug in the inferred spec: please report it")
            log.info("autoperm: %s checked: %s", name, verdict)

    def _example_inputs(self, model: torch.nn.Module) -> tuple:
        """The tracing inputs; floating-point ones in the model's dtype (a bfloat16 model takes bfloat16)."""
        if self.example_inputs is not None:
            ex = self.example_inputs
            return inputs_in(ex if isinstance(ex, tuple) else (ex,), floating_dtype(model))
        if self.input_shape is not None:
            return inputs_in(random_inputs([tuple(self.input_shape)], seed=self.seed), floating_dtype(model))
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            return inputs_in(random_inputs([tuple(cfg["input_size"])], seed=self.seed), floating_dtype(model))
        if is_hf_model(model):
            prepare_for_trace(model)
            return hf_example_inputs(model, seed=self.seed)
        raise ValueError("AutopermAlignment needs example inputs: set example_inputs or input_shape")

