"""Experiment 4: a tiny timm ViT on MNIST-5k, naive vs matched.

``vit_tiny_patch16_224`` resized to 28×28 inputs, 7×7 patches (16 tokens + class token), width
64, depth 3, 4 heads; Adam 1e-3, batch 128, trained from two seeds. The spec permutes the
residual stream, the heads, q/k and v within heads, and the MLP hidden units; B is aligned to A
by weight matching (and activation matching), then REPAIR is tried on top (LayerNorm outputs
and every biased Linear but the head).

    python examples/exp4_vit.py                  # about 5 minutes on 2 cores

Writes ``<out>/exp4_curves.png`` and ``<out>/exp4.json``.
"""
import os

import timm
import torch

import autoperm
from autoperm.barrier import barrier_table, endpoint_table, evaluator, interpolation_curve, relative_reduction, Repair
from autoperm.barrier.plot import plot_curves
from autoperm.data import mnist5k

from _common import align_all, cache_path, parse_args, save_json, train, train_batches


def vit() -> torch.nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                             num_classes=10, embed_dim=64, depth=3, num_heads=4)


def main():
    args = parse_args(__doc__.splitlines()[0], "exp4", lambda p: (
        p.add_argument("--epochs", type=int, default=40),
        p.add_argument("--methods", default="weight,activation"),
        p.add_argument("--points", type=int, default=11)))
    data = mnist5k(image=True)
    ev = evaluator(data)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = vit()
        train(m, data, epochs=args.epochs, lr=1e-3, batch_size=128, seed=seed,
              cache=cache_path(args, f"vit_e{args.epochs}_s{seed}"))
        models.append(m)
    spec = autoperm.infer_spec(models[0], data.x_train[:2])
    print("groups:", spec.group_sizes)
    batches = train_batches(data, 500, limit=4)
    aligned = align_all(spec, models[0], models[1], args.methods.split(","), batches)
    a = models[0].state_dict()
    lambdas = torch.linspace(0, 1, args.points).tolist()
    curves = {label: interpolation_curve(models[0], a, sb, ev, lambdas) for label, (sb, _) in aligned.items()}
    if "weight" in aligned:
        b_wm = aligned["weight"][0]
        curves["weight + REPAIR"] = interpolation_curve(models[0], a, b_wm, ev, lambdas,
                                                        repair=Repair(models[0], a, b_wm, batches))
    print("\nmatching time (s):", {k: round(s, 2) for k, (_, s) in aligned.items() if k != "naive"})
    print("\n" + endpoint_table(curves, ["train_loss", "test_loss", "test_acc"]))
    print("\n" + barrier_table(curves, ["train_loss", "test_loss", "test_error"], ["max_mean", "midpoint"]))
    naive = curves["naive"].barrier("test_loss")
    print("\nreduction of the test-loss barrier vs naive:",
          {k: round(relative_reduction(c.barrier("test_loss"), naive), 3) for k, c in curves.items()})
    plot = plot_curves(curves, os.path.join(args.out, "exp4_curves.png"), ["train_loss", "test_loss", "test_acc"],
                       title="tiny ViT (timm) on MNIST-5k")
    save_json(os.path.join(args.out, "exp4.json"), {
        "curves": {k: c.to_dict() for k, c in curves.items()},
        "matching_seconds": {k: s for k, (_, s) in aligned.items()}, "groups": spec.group_sizes})
    print(f"\nplot: {plot}")


if __name__ == "__main__":
    main()
