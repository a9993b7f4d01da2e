"""Experiment 3: small timm ResNets on MNIST-5k, with BatchNorm and with GroupNorm(1 group).

``timm.models.resnet.ResNet`` with one BasicBlock per stage, channels 16-32-64-128 (the stem has
timm's 64), trained from two seeds with SGD (nesterov, one-cycle, peak 0.05, wd 5e-4) on the
4,000 training images at 28×28. B is aligned to A by weight matching and by activation
matching; along the line from A to B (11 λ, which include ½) each is evaluated as is
(interpolated running statistics), with BatchNorm statistics reset, and with REPAIR.

REPAIR rescales the outputs of every norm layer (timm's convs have no bias) to the interpolated
endpoint statistics; in the GroupNorm net there are no running statistics to reset, so REPAIR is
the only repair. The relative reduction ``1 − B_repaired / B_as_is`` says how much of the
barrier left after matching comes from the statistics of the interpolated model.

    python examples/exp3_resnet_norms.py         # about 6 minutes on 2 cores

Writes ``<out>/exp3_<norm>_curves.png`` and ``<out>/exp3.json``.
"""
import os

import torch
from timm.layers import GroupNorm1
from timm.models.resnet import BasicBlock, ResNet

import autoperm
from autoperm.barrier import Repair, evaluator, interpolation_curve, markdown_table, relative_reduction
from autoperm.barrier.plot import plot_curves
from autoperm.data import mnist5k

from _common import align_all, cache_path, parse_args, save_json, timed, train, train_batches

NORMS = {"batchnorm": torch.nn.BatchNorm2d, "groupnorm": GroupNorm1}


def resnet(norm: str, channels=(16, 32, 64, 128)) -> ResNet:
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, in_chans=1, channels=channels, norm_layer=NORMS[norm])


def main():
    args = parse_args(__doc__.splitlines()[0], "exp3", lambda p: (
        p.add_argument("--epochs", type=int, default=10),
        p.add_argument("--norms", default="batchnorm,groupnorm"),
        p.add_argument("--points", type=int, default=11),
        p.add_argument("--methods", default="weight,activation")))
    data = mnist5k(image=True)
    ev = evaluator(data)
    stat_batches = train_batches(data, 500, limit=4)  # 2,000 training images for BN reset and REPAIR
    lambdas = torch.linspace(0, 1, args.points).tolist()
    out = {}
    for norm in args.norms.split(","):
        print(f"\n== ResNet with {norm} ==", flush=True)
        models = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            m = resnet(norm)
            train(m, data, epochs=args.epochs, lr=0.05, optimizer="sgd", weight_decay=5e-4, seed=seed,
                  cache=cache_path(args, f"resnet_{norm}_e{args.epochs}_s{seed}"))
            models.append(m)
        a = models[0].state_dict()
        spec = autoperm.infer_spec(models[0], data.x_train[:2])
        aligned = align_all(spec, models[0], models[1], args.methods.split(","), stat_batches)
        bn = norm == "batchnorm"
        runs = {}
        for label, (sb, _) in aligned.items():
            runs[label] = (sb, {})
            if bn:
                runs[f"{label} + BN reset"] = (sb, {"reset_bn": stat_batches})
            if label != "naive":
                runs[f"{label} + REPAIR"] = (sb, {"repair": Repair(models[0], a, sb, stat_batches)})
        curves = {}
        for label, (sb, kw) in runs.items():
            c, t = timed(interpolation_curve, models[0], a, sb, ev, lambdas, **kw)
            curves[label] = c
            print(f"  {label}: test-loss barrier {c.barrier('test_loss'):.3f} ({t:.0f} s)", flush=True)
        naive = curves["naive"].barrier("test_loss")
        rows = []
        for label, c in curves.items():
            b_test = c.barrier("test_loss")
            base = curves[label.split(" + ")[0]].barrier("test_loss")
            rows.append([label, c.barrier("train_loss"), b_test, 100 * c.barrier("test_error", "midpoint"),
                         100 * c.at("test_acc", 0.5), relative_reduction(b_test, naive),
                         relative_reduction(b_test, base) if " + " in label else float("nan")])
        print("\nmatching time (s):", {k: round(s, 2) for k, (_, s) in aligned.items() if k != "naive"})
        print(markdown_table(["", "train-loss barrier", "test-loss barrier", "midpoint test error rise (pts)",
                              "midpoint test acc %", "reduction vs naive", "reduction by the repair"], rows))
        plot = plot_curves(curves, os.path.join(args.out, f"exp3_{norm}_curves.png"), ["train_loss", "test_loss", "test_acc"],
                           title=f"ResNet (timm, {norm}) on MNIST-5k")
        print(f"plot: {plot}")
        out[norm] = {"curves": {k: c.to_dict() for k, c in curves.items()},
                     "matching_seconds": {k: s for k, (_, s) in aligned.items()}}
    save_json(os.path.join(args.out, "exp3.json"), out)


if __name__ == "__main__":
    main()
