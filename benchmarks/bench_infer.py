"""Time ``infer_spec`` (export + rules + spec) on resnet50 and vit_base_patch16_224; writes docs/performance.md.

Run: python benchmarks/bench_infer.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import timm
import torch

import autoperm
from autoperm._infer import _build_spec, _run
from autoperm._trace import trace
from _docs import write_section

MODELS = ["resnet50", "vit_base_patch16_224"]


def measure(name: str, repeats: int) -> dict:
    m = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(1, *m.pretrained_cfg["input_size"])
    t0 = time.perf_counter()
    autoperm.infer_spec(m, x)
    first = time.perf_counter() - t0
    total, export, analysis = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tm = trace(m, x)
        t1 = time.perf_counter()
        spec = _build_spec(_run(tm), m)
        t2 = time.perf_counter()
        export.append(t1 - t0); analysis.append(t2 - t1); total.append(t2 - t0)
    return {"model": name, "first": first, "total": statistics.median(total), "export": statistics.median(export),
            "analysis": statistics.median(analysis), "nodes": len(tm.graph.nodes), "groups": len(spec.groups)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--doc", default=os.path.join(os.path.dirname(__file__), "..", "docs", "performance.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [measure(n, a.repeats) for n in MODELS]
    lines = [
        "## Inference (`infer_spec`)",
        "",
        f"Measured by `benchmarks/bench_infer.py` on {os.cpu_count()} CPU cores ({platform.machine()}), "
        f"torch {torch.__version__}, {a.threads} threads, median of {a.repeats} warm runs; batch 1, the model's "
        "default input size. `export` is `torch.export` (non-strict); `analysis` is the rule walk and spec building.",
        "",
        "| model | graph nodes | groups | first call (s) | warm total (s) | export (s) | analysis (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nodes']} | {r['groups']} | {r['first']:.2f} | {r['total']:.2f} | "
                     f"{r['export']:.2f} | {r['analysis']:.3f} |")
        print(r)
    write_section(a.doc, "infer", "\n".join(lines), title="Performance")


if __name__ == "__main__":
    main()
