"""Experiment 2: barrier against width, 3-hidden-layer MLPs on scikit-learn's 8×8 digits.

For each width in 16, 32, 64, 128, 256, 512: several independently trained pairs (Adam 1e-3,
batch 128, 60 epochs); the train- and test-loss barriers (max vs mean) naive and after weight
matching (and activation matching). Git Re-Basin (its Figure 4) reports that the barrier after
matching falls with width; this checks it on real data in seconds per model.

    python examples/exp2_width_sweep.py          # about 3 minutes on 2 cores

Writes ``<out>/exp2_width.png`` and ``<out>/exp2.json``.
"""
import os

import numpy as np
import torch

import autoperm
from autoperm.barrier import evaluator, markdown_table
from autoperm.barrier.plot import plot_series
from autoperm.data import digits

from _common import align_all, cache_path, curves_for, mlp, parse_args, save_json, train, train_batches


def main():
    args = parse_args(__doc__.splitlines()[0], "exp2", lambda p: (
        p.add_argument("--widths", default="16,32,64,128,256,512"),
        p.add_argument("--pairs", type=int, default=3),
        p.add_argument("--epochs", type=int, default=60),
        p.add_argument("--methods", default="weight,activation")))
    data = digits()
    ev = evaluator(data)
    widths = [int(w) for w in args.widths.split(",")]
    methods = ["naive", *args.methods.split(",")]
    batches = train_batches(data, 500)
    results = {}  # width -> method -> metric -> list over pairs
    for w in widths:
        res = {m: {"train_loss": [], "test_loss": [], "test_error": []} for m in methods}
        for p in range(args.pairs):
            pair = []
            for seed in (2 * p + 1, 2 * p + 2):
                torch.manual_seed(seed)
                m = mlp(64, [w] * 3)
                train(m, data, epochs=args.epochs, lr=1e-3, batch_size=128, seed=seed, log=False,
                      cache=cache_path(args, f"digits_w{w}_e{args.epochs}_s{seed}"))
                pair.append(m)
            spec = autoperm.infer_spec(pair[0], data.x_train[:2])
            aligned = align_all(spec, pair[0], pair[1], methods[1:], batches, seed=p)
            curves = curves_for(pair[0], pair[0].state_dict(), aligned, ev)
            for label, c in curves.items():
                for metric in res[label]:
                    res[label][metric].append(c.barrier(metric))
        results[w] = res
        print(f"width {w}: " + ", ".join(
            f"{m} train {np.mean(r['train_loss']):.3f} test {np.mean(r['test_loss']):.3f}" for m, r in res.items()),
            flush=True)

    rows = [[w, *(f"{np.mean(results[w][m][k]):.3f} ± {np.std(results[w][m][k]):.3f}"
                  for k in ("train_loss", "test_loss") for m in methods)] for w in widths]
    header = ["width", *(f"{k} {m}" for k in ("train", "test") for m in methods)]
    print(f"\nloss barrier (max vs mean), mean ± std over {args.pairs} pairs:\n" + markdown_table(header, rows))
    series = {f"{m}": [np.mean(results[w][m]["train_loss"]) for w in widths] for m in methods}
    errors = {f"{m}": [np.std(results[w][m]["train_loss"]) for w in widths] for m in methods}
    plot = plot_series(widths, series, os.path.join(args.out, "exp2_width.png"), "hidden width",
                       "train-loss barrier (max vs mean)", "digits MLP, 3 hidden layers", logx=True, errors=errors)
    save_json(os.path.join(args.out, "exp2.json"), {str(w): r for w, r in results.items()})
    print(f"\nplot: {plot}")


if __name__ == "__main__":
    main()
