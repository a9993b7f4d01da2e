"""Aligning two models on torch.distributed: data-parallel statistics, sharded weight matching.

Launched by torchrun; every rank runs this script on its own share of the data:

    torchrun --nproc_per_node=2 examples/distributed_align.py            # 2 CPU processes (gloo)
    torchrun --nproc_per_node=4 examples/distributed_align.py --device cuda   # 4 GPUs (nccl)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
        examples/distributed_align.py --device cuda                     # 2 nodes of 8 GPUs

Two timm ResNets (random weights, ``pretrained=False``; any two trained checkpoints go the same
way) on the 4,000 MNIST training images of ``autoperm.data.mnist5k``, in batches that
``autoperm.distributed.shard`` deals out to the ranks:

1. ``activation_matching(..., process_group=group)``: each rank streams its batches, the float64
   sums are all-reduced, every rank gets the same permutation;
2. ``weight_matching(..., process_group=group)`` with each rank holding only every
   ``world``-th key of the two state dicts (as if the models were sharded);
3. ``interpolation_curve(..., reset_bn=..., repair=..., process_group=group)`` with
   ``evaluator(..., process_group=group)``: BatchNorm reset, REPAIR and the test metrics over all
   ranks' data.

``--check`` also runs each step alone on rank 0 (on all the data) and asserts that the
permutations are the same. Rank 0 prints the seconds of each step; ``--json PATH`` writes them.
"""
import argparse
import json
import time

import torch
import torch.distributed as dist

import autoperm
from autoperm import distributed
from autoperm.barrier import evaluator, interpolation_curve
from autoperm.data import mnist5k


def timed(group, fn, *args, **kwargs):
    """``(fn(...), seconds)``, the ranks starting together (a barrier before and after)."""
    distributed.barrier(group)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    distributed.barrier(group)
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help="a timm model name (random weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any rank may wait for the others")
    p.add_argument("--steps", default="activation,weight,curve")
    p.add_argument("--check", action="store_true", help="compare with one process on rank 0")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    device = distributed.init(args.device, timeout=args.timeout)  # gloo on the CPU, nccl on CUDA
    group = dist.group.WORLD
    rank, world = distributed.rank(group), distributed.world_size(group)

    import timm
    data = mnist5k(image=True)
    torch.manual_seed(0)
    model_a = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10).to(device)
    torch.manual_seed(1)
    model_b = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10).to(device)
    batches = [(x.to(device), y.to(device)) for x, y in data.batches("train", args.batch_size)]
    mine = list(distributed.shard(batches, group))  # this rank's batches: rank, rank + world, ...
    spec = autoperm.infer_spec(model_a, batches[0][0][:2])
    timings = {"world": world, "model": args.model, "batches": len(batches), "batch_size": args.batch_size}
    steps = args.steps.split(",")

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    if "activation" in steps:
        perm, t = timed(group, autoperm.activation_matching, spec, model_a, model_b, mine, progress=False,
                        process_group=group)
        timings["activation_matching_s"] = t
        say(f"activation matching on {world} rank(s): {t:.2f} s")
        if args.check and rank == 0:
            alone = autoperm.activation_matching(spec, model_a, model_b, batches, progress=False)
            assert all(torch.equal(alone[g], perm[g]) for g in perm), "activation matching differs from one process"
            say("  the same permutation as one process")
    if "weight" in steps:
        state_a, state_b = model_a.state_dict(), model_b.state_dict()
        keys = list(state_a)[rank::world]  # this rank's shard of the keys
        perm, t = timed(group, autoperm.weight_matching, spec, {k: state_a[k] for k in keys},
                        {k: state_b[k] for k in keys}, progress=False, process_group=group)
        timings["weight_matching_s"] = t
        say(f"weight matching, state dicts sharded over {world} rank(s): {t:.2f} s")
        if args.check and rank == 0:
            alone = autoperm.weight_matching(spec, state_a, state_b, progress=False)
            assert all(torch.equal(alone[g], perm[g]) for g in perm), "weight matching differs from one process"
            say("  the same permutation as one process")
        aligned = autoperm.apply_permutation(spec, perm, state_b)
        if "curve" in steps:
            x_test, y_test = data.x_test[rank::world].to(device), data.y_test[rank::world].to(device)
            curve, t = timed(group, interpolation_curve, model_a, state_a, aligned,
                             evaluator((x_test, y_test), process_group=group), [0.0, 0.5, 1.0],
                             reset_bn=mine, repair=mine, process_group=group)
            timings["curve_s"] = t
            say(f"curve with BN reset and REPAIR: {t:.2f} s; test loss {curve.loss.round(3).tolist()}")
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(timings, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
