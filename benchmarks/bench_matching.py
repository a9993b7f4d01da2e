"""Time weight matching on pairs of independently initialised timm models; writes docs/performance.md.

For each model: the whole ``weight_matching`` run (sweeps to convergence), one sweep from the
identity, and what one sweep cannot avoid: for every place a group acts, the product
``A_G @ B_G^T`` on matrices already laid out (contiguous float32, no gathers), and one
assignment per group on its cost matrix with the same solver. Peak memory of weight matching on
vit_base_patch16_224 is measured in a fresh subprocess from the kernel's peak resident set size
(VmHWM, reset through /proc/self/clear_refs just before matching), relative to the bytes of the
two state dicts.

Run: python benchmarks/bench_matching.py [--threads 2] [--models resnet50,...] [--no-doc]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import timm
import torch

import autoperm
from autoperm.matching import _lap
from autoperm.matching._costs import CostCache, build_layout, check_states
from autoperm.matching.weight import descend_groups

sys.path.insert(0, os.path.dirname(__file__))
from _docs import write_section  # noqa: E402

MODELS = ["resnet50", "vit_base_patch16_224", "convnext_tiny"]
MEMORY_MODEL = "vit_base_patch16_224"


def pair(name: str):
    torch.manual_seed(0)
    a = timm.create_model(name, pretrained=False).eval()
    torch.manual_seed(1)
    b = timm.create_model(name, pretrained=False).eval()
    spec = autoperm.infer_spec(a, torch.randn(1, *a.pretrained_cfg["input_size"]))
    return spec, a.state_dict(), b.state_dict()


def unavoidable(spec, sa, sb) -> tuple[float, float, float]:
    """(seconds of products, seconds of assignments, GFLOP) of one sweep, on pre-laid-out matrices."""
    layout = build_layout(spec)
    mats = []
    for g, units in layout.units.items():
        n = spec.group_sizes[g]
        mats.append([(sa[u.key].movedim(u.axis, 0).reshape(n, -1).contiguous().float(),
                      sb[u.key].movedim(u.axis, 0).reshape(n, -1).contiguous().float()) for u in units
                     if u.table is None] + [(torch.randn(n, sa[u.key].numel() // n), torch.randn(n, sa[u.key].numel() // n))
                                            for u in units if u.table is not None])
    flops = sum(2 * a.shape[0] ** 2 * a.shape[1] for ms in mats for a, _ in ms)
    t0 = time.perf_counter()
    for ms in mats:
        cost = None
        for a, b in ms:
            cost = a @ b.T if cost is None else cost.addmm_(a, b.T)
    products = time.perf_counter() - t0
    costs = CostCache(spec, sa, sb, torch.float32)
    ident = autoperm.identity_permutation(spec)
    matrices = [costs.cost(("units", g), layout.units[g], ident).double().numpy() for g in layout.units]
    t0 = time.perf_counter()
    for c in matrices:
        _lap.solve_numpy(np.ascontiguousarray(c))
    return products, time.perf_counter() - t0, flops / 1e9


def measure(name: str, repeats: int) -> dict:
    spec, sa, sb = pair(name)
    t0 = time.perf_counter()
    check_states(spec, state_a=sa, state_b=sb)
    check = time.perf_counter() - t0
    totals, stats = [], {}
    for _ in range(repeats):
        stats = {}
        t0 = time.perf_counter()
        descend_groups(spec, sa, sb, None, None, progress=False, stats=stats)
        totals.append(time.perf_counter() - t0 + check)
    t0 = time.perf_counter()
    descend_groups(spec, sa, sb, None, None, max_iter=1, progress=False, unknown=set())
    sweep = time.perf_counter() - t0 + check
    t0 = time.perf_counter()
    descend_groups(spec, sa, sb, None, None, max_iter=1, progress=False)
    seed = time.perf_counter() - t0 + check - sweep
    products, solves, gflop = unavoidable(spec, sa, sb)
    return {"model": name, "groups": len(spec.group_sizes), "total": float(np.median(totals)),
            "sweeps": stats["sweeps"][0], "solves": stats["solves"], "sweep": sweep, "seed": seed, "products": products,
            "assignments": solves, "gflop": gflop}


def memory_child(name: str) -> None:
    """Runs in a fresh process: print peak RSS during weight matching vs. the state dicts' bytes."""
    import gc

    spec, sa, sb = pair(name)
    gc.collect()
    size = sum(t.numel() * t.element_size() for s in (sa, sb) for t in s.values())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM)
    before = _status("VmRSS")
    autoperm.weight_matching(spec, sa, sb, progress=False)
    print(json.dumps({"state_bytes": size, "rss_before": before, "peak": _status("VmHWM")}))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory(name: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", name, "--threads", str(threads)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["extra"] = r["peak"] - r["rss_before"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--memory-child")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--doc", default=os.path.join(os.path.dirname(__file__), "..", "docs", "performance.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.memory_child)
    load = os.getloadavg()[0]
    rows = []
    for name in a.models.split(","):
        rows.append(measure(name, a.repeats))
        print(json.dumps(rows[-1]), flush=True)
    mem = memory(MEMORY_MODEL, a.threads) if MEMORY_MODEL in a.models.split(",") else None
    if mem:
        print(json.dumps(mem), flush=True)
    load = max(load, os.getloadavg()[0])
    solver = "LAPJV from the `lap` package" if _lap._lap is not None else "scipy `linear_sum_assignment`"
    lines = [
        "## Matching (`weight_matching`)",
        "",
        f"Measured by `benchmarks/bench_matching.py` on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"torch {torch.__version__}, {a.threads} threads, float32 products, assignments by {solver}; "
        "two independently initialised models (`pretrained=False`, seeds 0 and 1). "
        f"Highest 1-minute load average during the run: {load:.1f}"
        + (" (other processes were running: absolute times are inflated, ratios less so)." if load > a.threads * 0.75
           else "."),
        "",
        "- *total*: `weight_matching` to convergence (input checks included); *sweeps*: sweeps it took, the last "
        "one changing nothing; *solves*: cost matrices built and assigned (a group whose neighbours did not "
        "change is not solved again);",
        "- *one sweep*: one sweep of the descent from the identity, every group solved once; *seed*: the greedy "
        "pass that picks the starting point before the first sweep (each group solved once on the tensors whose "
        "other groups are already solved), timed as the extra cost of a seeded one-sweep run;",
        "- *products* and *assignments*: what one sweep cannot avoid, timed bare: every `A_G @ B_G^T` on "
        "pre-laid-out float32 matrices, and one assignment per group; *ratio* = one sweep / (products + assignments).",
        "",
        "| model | groups | total (s) | sweeps | solves | one sweep (s) | seed (s) | products (s) | GFLOP | assignments (s) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['groups']} | {r['total']:.2f} | {r['sweeps']} | {r['solves']} | "
                     f"{r['sweep']:.2f} | {r['seed']:.2f} | {r['products']:.2f} | {r['gflop']:.0f} | {r['assignments']:.2f} | "
                     f"{r['sweep'] / (r['products'] + r['assignments']):.2f} |")
    if mem:
        gib = 2 ** 30
        lines += [
            "",
            f"Peak memory of `weight_matching` on {MEMORY_MODEL} (fresh process, peak resident set size VmHWM reset "
            f"just before the call): the two state dicts hold {mem['state_bytes'] / gib:.2f} GiB; the process held "
            f"{mem['rss_before'] / gib:.2f} GiB before matching and peaked at {mem['peak'] / gib:.2f} GiB, so "
            f"matching added {mem['extra'] / gib:.2f} GiB = {mem['extra'] / mem['state_bytes']:.2f}× the state "
            f"dicts (state dicts + matching = {(mem['state_bytes'] + mem['extra']) / mem['state_bytes']:.2f}× the "
            "state dicts).",
        ]
    print("\n".join(lines))
    if not a.no_doc:
        write_section(a.doc, "matching", "\n".join(lines), title="Performance")


if __name__ == "__main__":
    main()
