"""The ``autoperm`` commands on transformers folders (dispatched here by ``autoperm.cli``)."""
from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

from ..io import CheckpointError, permutation_to_dict, write_text
from ._model import is_model_folder, open_folder
from .align import align_folders

__all__ = ["inspect_folder", "align_folder_pair"]


def _described(fm, example) -> SimpleNamespace:
    """What ``format_spec`` prints about a model: its name, source and example input shapes."""
    arch = (getattr(fm.model.config, "architectures", None) or [type(fm.model).__name__])[0]
    return SimpleNamespace(name=fm.folder, source=f"{arch} on the meta device",
                           input_shapes=[tuple(x.shape[1:]) for x in example])


def inspect_folder(args, log, tol: float = 1e-4) -> tuple:
    """``(spec, description, invariance verdict or None)`` of the folder ``args.model``; its weights are not read."""
    t = time.perf_counter()
    fm = open_folder(args.model)
    example = fm.example_inputs()
    spec = fm.spec(example)
    log(f"spec: {len(spec.group_sizes)} groups, {spec.num_units} units, inferred on the meta device in "
        f"{time.perf_counter() - t:.1f} s ({fm.files.nbytes / 1e9:.2f} GB of weights in "
        f"{len(fm.files.files)} files, not read)")
    err = None
    if args.check:  # a model with random weights, built from the config: memory for one model in float32
        from ..check import randomize_
        from ..equivalence import invariance_verdict

        model = type(fm.model)(fm.model.config).eval()
        err = invariance_verdict(randomize_(model), spec, example, tol=tol)
    return spec, _described(fm, example), err


def align_folder_pair(args, log) -> int:
    """``autoperm align A_DIR B_DIR -o OUT_DIR``: streaming weight matching and a streaming write."""
    for p, name in ((args.a, "A"), (args.b, "B")):
        if not is_model_folder(p):
            raise CheckpointError(f"{p}: not a transformers model folder (no config.json); {name} and the other "
                                  "input must both be folders")
    if args.method != "weight":
        raise CheckpointError(f"--method {args.method} runs the models on data, in memory; model folders are "
                              "aligned by --method weight (streaming)")
    if args.restarts < 1 or args.max_iter < 0:
        raise CheckpointError("--restarts must be >= 1 and --max-iter >= 0")
    _return_large_frees()
    t = time.perf_counter()
    ref = open_folder(args.a)
    open_folder(args.b, ref.model)  # both folders checked (keys, shapes, files) before any work
    spec = ref.spec()
    log(f"spec: {len(spec.group_sizes)} groups, {spec.num_units} units, inferred on the meta device in "
        f"{time.perf_counter() - t:.1f} s")
    perms = align_folders([args.a, args.b], [None, args.output], spec=spec, seed=args.seed, max_iter=args.max_iter,
                          restarts=args.restarts, verify=False if args.no_verify else None, log=log,
                          extra={"autoperm_version": _version()})
    if args.perm_out:
        write_text(args.perm_out, json.dumps(permutation_to_dict(perms[1])) + "\n", inputs=(args.a, args.b))
    if args.spec_out:
        write_text(args.spec_out, spec.to_json(indent=2) + "\n", inputs=(args.a, args.b))
    return 0


def _return_large_frees() -> None:
    """Have glibc serve every allocation over 1 MiB by mmap, so that it goes back to the system when freed.

    By default glibc raises that threshold to the size of each large block freed (up to 32 MiB), and
    memory freed below it stays in the process: streaming matching allocates and frees blocks of
    every size, and its measured peak on Llama-3.2-1B fell from 2.84 to 2.42 GB with a fixed
    threshold. The command owns its process, so it sets this; elsewhere (not glibc) it does nothing."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _version() -> str:
    from .. import __version__

    return __version__
