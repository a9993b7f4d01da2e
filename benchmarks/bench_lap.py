"""Time the assignment solvers on the cost matrices weight matching meets; writes docs/performance.md.

For each model, one weight-matching run (two independently initialised timm models, seeds 0 and 1)
records every cost matrix it solves; each solver then solves all of them again, one by one, and
must reach the same objective as scipy. Solvers: LAPJV from ``lap`` on the negated costs (what
autoperm used before), LAPJV on row-reduced costs (``autoperm.matching._lap.solve_numpy`` itself), and
scipy's ``linear_sum_assignment``.

Run: python benchmarks/bench_lap.py [--threads 1] [--models convnext_tiny,...] [--no-doc]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import lap
import numpy as np
import timm
import torch
from scipy.optimize import linear_sum_assignment

import autoperm
import autoperm.matching.weight as weight
from autoperm.matching import _lap

sys.path.insert(0, os.path.dirname(__file__))
from _docs import write_section  # noqa: E402

MODELS = ["convnext_tiny", "resnet50", "vit_base_patch16_224"]
SOLVERS = {
    "LAPJV, negated costs": lambda c: lap.lapjv(-c, extend_cost=False)[1],
    "LAPJV, row-reduced costs": lambda c: _lap.solve_numpy(c),  # what every matcher calls
    "scipy linear_sum_assignment": lambda c: linear_sum_assignment(c, maximize=True)[1],
}


def cost_matrices(name: str) -> list[np.ndarray]:
    """Every cost matrix one weight-matching run on a pair of ``name`` solves, in order."""
    torch.manual_seed(0)
    a = timm.create_model(name, pretrained=False).eval()
    torch.manual_seed(1)
    b = timm.create_model(name, pretrained=False).eval()
    spec = autoperm.infer_spec(a, torch.randn(1, *a.pretrained_cfg["input_size"]))
    mats, real = [], _lap.solve_numpy
    weight.solve_numpy = lambda c: (mats.append(c.copy()), real(c))[1]
    try:
        autoperm.weight_matching(spec, a.state_dict(), b.state_dict(), progress=False)
    finally:
        weight.solve_numpy = real
    return mats


def measure(mats: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per solver: (total seconds, slowest single matrix); each answer checked against scipy's objective."""
    best = [c[np.arange(len(c)), linear_sum_assignment(c, maximize=True)[1]].sum() for c in mats]
    out = {}
    for solver, f in SOLVERS.items():
        total = worst = 0.0
        for c, want in zip(mats, best):
            t = time.perf_counter()
            x = f(c)
            dt = time.perf_counter() - t
            total, worst = total + dt, max(worst, dt)
            got = c[np.arange(len(c)), x].sum()
            assert abs(got - want) <= 1e-9 * max(1.0, float(np.abs(c).sum())), (solver, got, want)
        out[solver] = (total, worst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = ["| model | matrices | largest | solver | total (s) | slowest matrix (s) |", "|---|---:|---:|---|---:|---:|"]
    for name in args.models.split(","):
        mats = cost_matrices(name)
        for solver, (total, worst) in measure(mats).items():
            rows.append(f"| {name} | {len(mats)} | {max(len(c) for c in mats)} | {solver} | {total:.2f} | {worst:.2f} |")
            print(rows[-1], flush=True)
    body = "\n".join([
        f"Measured by `benchmarks/bench_lap.py` (lap {lap.__version__}, torch {torch.__version__}, {args.threads} "
        f"thread(s)): every cost matrix of one weight-matching run, solved again by each solver; all reach "
        f"scipy's objective.", "", *rows])
    print(body)
    if not args.no_doc:
        write_section(os.path.join(os.path.dirname(__file__), "..", "docs", "performance.md"), "lap", body)


if __name__ == "__main__":
    main()
