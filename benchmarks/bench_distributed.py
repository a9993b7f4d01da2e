"""Scaling of data-parallel activation matching with the number of processes (torchrun, gloo, CPU).

Runs ``examples/distributed_align.py --steps activation`` under ``torchrun --nproc_per_node=N``
for each N, ``--repeat`` times, one thread per process, and prints a markdown table of the
activation-matching seconds (barrier to barrier, process start-up and model building excluded)
with the 1-minute load average before each run.

    python benchmarks/bench_distributed.py --procs 1 2 --repeat 3
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run(n: int, model: str, batch_size: int, port: int) -> tuple[float, float]:
    """``(activation-matching seconds, load average before)`` of one torchrun launch of ``n`` processes."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.json")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master-port={port}",
               os.path.join(ROOT, "examples", "distributed_align.py"), "--steps", "activation", "--device", "cpu",
               "--model", model, "--batch-size", str(batch_size), "--json", out]
        subprocess.run(cmd, env=env, check=True, timeout=1800, stdout=subprocess.DEVNULL)
        with open(out) as f:
            return json.load(f)["activation_matching_s"], load


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--port", type=int, default=29531)
    args = p.parse_args()
    rows = {n: [] for n in args.procs}
    for _ in range(args.repeat):
        for n in args.procs:  # interleaved, so that a change of load hits every N alike
            rows[n].append(run(n, args.model, args.batch_size, args.port))
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, one thread per process, "
          f"{args.model} (random weights), mnist5k train (4,000 images at 28x28), batch {args.batch_size}\n")
    print("| processes | runs (s) | median (s) | speed-up | load before runs |")
    print("|---:|---|---:|---:|---|")
    base = statistics.median(t for t, _ in rows[args.procs[0]])
    for n, runs in rows.items():
        med = statistics.median(t for t, _ in runs)
        print(f"| {n} | {', '.join(f'{t:.1f}' for t, _ in runs)} | {med:.1f} | {base / med:.2f} | "
              f"{', '.join(f'{ld:.1f}' for _, ld in runs)} |")


if __name__ == "__main__":
    main()
