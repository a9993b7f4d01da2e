"""Experiment 7: alignment with continuous symmetries (orthogonal streams and heads, rotary angles, scalings).

Pairs (``examples/_pairs.py``, cached under ``~/.cache/autoperm/pairs``): the tiny timm ViT of
experiment 4 on MNIST-5k, and a 4-layer Llama (RoPE, RMSNorm, SwiGLU, GQA) trained as a
character-level language model of the Python standard library's source. The spec's maps are
those of ``examples/_handmaps.py`` (checked first), or with ``--maps inferred`` those that
``infer_spec(..., maps=True)`` finds.

For each pair: naive, permutations only, permutations plus each kind of map, and all kinds, by
weight matching and by activation matching; B is aligned with ``autoperm.maps.align_state`` (norm
scales folded, moved, unfolded with A's) and the linear path from A to aligned B is evaluated.

    python examples/exp7_maps.py                 # both pairs
    python examples/exp7_maps.py --pairs vit

Resumable: aligned states' curves and timings are cached under ``<out>/cache``. Writes
``<out>/exp7.json`` and ``<out>/exp7.md`` (the table of ``docs/results.md``).
"""
import dataclasses
import os
import sys
import time

import numpy as np
import torch

import autoperm
from autoperm.barrier import evaluator, interpolation_curve
from autoperm.barrier.curve import Curve
from autoperm.barrier.report import markdown_table
from autoperm.maps import align_state, check_symmetries

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parse_args, save_json, train_batches  # noqa: E402
from _handmaps import llama_maps, vit_maps  # noqa: E402
from _pairs import load_pair  # noqa: E402

#: label -> (matcher, kinds or None)
METHODS = {
    "naive": (None, None),
    "weight: permutations": ("weight", None),
    "weight: + orthogonal": ("weight", ("orthogonal",)),
    "weight: + rotary": ("weight", ("rotary",)),
    "weight: + scale": ("weight", ("scale",)),
    "weight: + all": ("weight", ("orthogonal", "rotary", "scale")),
    "weight: + invertible heads": ("weight", ("orthogonal", "rotary", "scale", "invertible")),
    "activation: permutations": ("activation", None),
    "activation: + orthogonal": ("activation", ("orthogonal",)),
    "activation: + all": ("activation", ("orthogonal", "rotary", "scale")),
    "activation: + invertible heads": ("activation", ("orthogonal", "rotary", "scale", "invertible")),
}


def setup(name: str):
    """``(model_a, model_b, evaluate, loss metric, activation batches, example input, maps)``."""
    a, b, data = load_pair(name)
    if name == "vit":
        return a, b, evaluator(data), "test_loss", train_batches(data, 500, limit=4), data.x_train[:2], vit_maps(a)
    return a, b, data.evaluate, "val_loss", data.input_batches(8, 32), data.val_inputs[:2, :32], llama_maps(a)


def match(label, spec, a, b, batches, seed=0):
    """``(aligned state of B, seconds)``."""
    how, kinds = METHODS[label]
    sa, sb = a.state_dict(), b.state_dict()
    t0 = time.time()
    if how is None:
        return sb, 0.0
    if how == "weight":
        res = autoperm.weight_matching(spec, sa, sb, kinds=kinds, seed=seed, progress=False)
    else:
        res = autoperm.activation_matching(spec, a, b, batches, kinds=kinds, seed=seed, progress=False)
    sec = time.time() - t0
    return align_state(spec, sa, sb, res), sec


def main():
    args = parse_args(__doc__.splitlines()[0], "exp7", lambda p: (
        p.add_argument("--pairs", default="vit,llama"),
        p.add_argument("--methods", default=",".join(METHODS)),
        p.add_argument("--points", type=int, default=11),
        p.add_argument("--maps", choices=("hand", "inferred"), default="hand",
                       help="the maps of _handmaps.py (the table in docs/results.md) or those infer_spec finds")))
    cache = os.path.join(args.out, "cache" if args.maps == "hand" else "cache-inferred")
    os.makedirs(cache, exist_ok=True)
    lambdas = torch.linspace(0, 1, args.points).tolist()
    results, rows = {}, []
    for name in args.pairs.split(","):
        a, b, evaluate, metric, batches, x, maps = setup(name)
        spec = autoperm.infer_spec(a, x, maps=args.maps == "inferred")
        source = "inferred"
        if args.maps == "inferred":
            err = check_symmetries(a, spec, x, seed=0, dtype=torch.float64)
            print(f"{name}: {len(spec.maps)} inferred maps, invariance error {err:.2e}", flush=True)
        if not spec.maps:
            spec, source = dataclasses.replace(spec, maps=maps), "declared by hand"
            err = check_symmetries(a, spec, x, seed=0, dtype=torch.float64)
            print(f"{name}: hand-declared maps, invariance error {err:.2e}", flush=True)
            if err > 1e-5:
                raise SystemExit(f"{name}: the hand-declared maps change the function ({err:.2e})")
        kinds_here = {m.kind for m in spec.maps}
        results[name] = {"maps": source, "map_count": {k: sum(m.kind == k for m in spec.maps) for k in sorted(kinds_here)},
                         "curves": {}, "seconds": {}}
        for label in args.methods.split(","):
            how, kinds = METHODS[label]
            if kinds and len(kinds) == 1 and kinds[0] not in kinds_here:
                continue
            path = os.path.join(cache, f"{name}__{label.replace(' ', '').replace(':', '_').replace('+', 'p')}.pt")
            if os.path.exists(path):
                saved = torch.load(path, weights_only=False)
            else:
                print(f"{name}: {label} ...", flush=True)
                sb, sec = match(label, spec, a, b, batches)
                curve = interpolation_curve(a, a.state_dict(), sb, evaluate, lambdas)
                saved = {"curve": curve.to_dict(), "seconds": sec}
                torch.save(saved, path)
            results[name]["curves"][label] = saved["curve"]
            results[name]["seconds"][label] = saved["seconds"]
            print(f"{name}: {label}: barrier {_barrier(saved['curve'], metric):.4f}, "
                  f"{saved['seconds']:.1f} s", flush=True)
        naive = _barrier(results[name]["curves"]["naive"], metric)
        for label, c in results[name]["curves"].items():
            rows.append([name, label, f"{_barrier(c, metric):.4f}", f"{_barrier(c, metric) / naive:.1%}" if naive else "-",
                         f"{_mid(c, metric):.4f}", _extra(c), f"{results[name]['seconds'][label]:.1f}"])
    save_json(os.path.join(args.out, "exp7.json"), results)
    table = markdown_table(["pair", "method", "loss barrier", "of naive", "midpoint loss", "midpoint acc / ppl",
                            "matching (s)"], rows)
    with open(os.path.join(args.out, "exp7.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)


def _curve(c) -> Curve:
    return Curve(np.asarray(c["lambdas"]), {k: np.asarray(v) for k, v in c["metrics"].items()})


def _barrier(c, metric) -> float:
    """The ``max_mean`` barrier: ``max_λ L(λ) - (L(0) + L(1)) / 2``."""
    return _curve(c).barrier(metric)


def _mid(c, metric) -> float:
    return _curve(c).at(metric, 0.5)


def _extra(c) -> str:
    lam, m = c["lambdas"], c["metrics"]
    i = min(range(len(lam)), key=lambda k: abs(lam[k] - 0.5))
    if "test_acc" in m:
        return f"{m['test_acc'][i]:.3f}"
    if "val_ppl" in m:
        return f"{m['val_ppl'][i]:.2f}"
    return "-"


if __name__ == "__main__":
    main()
