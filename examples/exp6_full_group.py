"""Experiment 6: matching over the full group (independent permutations per head and per expert) vs the shared subgroup.

Pairs (``examples/_pairs.py``, cached under ``~/.cache/autoperm/pairs``): the tiny timm ViT of
experiment 4 on MNIST-5k, a 4-layer Mixtral (4 experts, top-2) and a 4-layer Llama (RoPE, GQA)
trained as character-level language models of the Python standard library's source.

The *full group* is the spec as inferred: heads permute, and inside every head (for GQA: every
key/value group) its own permutation of the value dims (and of the query heads of the group); every
expert's hidden units permute on their own. The *shared subgroup* is the same spec with one inner
permutation for all blocks (``autoperm.matching._blocks.shared_view``). B is aligned to A by weight
matching and by activation matching over each, and the linear path from A to aligned B is evaluated.

    python examples/exp6_full_group.py                 # trains what is not cached, then matches (about 30 min)
    python examples/exp6_full_group.py --pairs vit     # one pair
    python examples/exp6_full_group.py --methods naive,weight5/shared,weight5/full   # best of 5 orders

Resumable: permutations and curves are cached under ``<out>/cache``. Writes ``<out>/exp6.json``
and ``<out>/exp6.md`` (the table of ``docs/results.md``).
"""
import os
import sys
import time

import torch

import autoperm
from autoperm.barrier import evaluator, interpolation_curve
from autoperm.barrier.curve import Curve
from autoperm.barrier.report import markdown_table
from autoperm.matching._blocks import expand_rows, shared_view

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import parse_args, save_json, train_batches  # noqa: E402
from _pairs import load_pair  # noqa: E402

METHODS = "naive,weight/shared,weight/full,activation/shared,activation/full"


def setup(name: str):
    """``(model_a, model_b, evaluate, loss metric, activation batches, example input)`` of a pair."""
    a, b, data = load_pair(name)
    if name == "vit":
        return a, b, evaluator(data), "test_loss", train_batches(data, 500, limit=4), data.x_train[:2]
    return a, b, data.evaluate, "val_loss", data.input_batches(8, 32), data.val_inputs[:2, :32]


def match(method: str, spec, a, b, batches):
    """``(permutation of the full group, seconds)``; a shared-subgroup result is expanded to rows per block."""
    kind, group = method.split("/")
    s = spec if group == "full" else shared_view(spec)
    t0 = time.time()
    if kind in ("weight", "weight5"):  # weight5: the best of 5 visiting orders
        perm = autoperm.weight_matching(s, a.state_dict(), b.state_dict(), progress=False,
                                        restarts=5 if kind == "weight5" else 1)
    else:
        perm = autoperm.activation_matching(s, a, b, batches, progress=False)
    sec = time.time() - t0
    return expand_rows(spec, {g: torch.as_tensor(p) for g, p in perm.items()}), sec


def objective(spec, sa, sb) -> float:
    """Weight matching's objective ``Σ <A, B>`` over the permuted tensors (float64)."""
    return float(sum(torch.sum(sa[k].double() * sb[k].double()) for k in spec.axes if any(spec.axes[k])))


def run_pair(name: str, args) -> dict:
    methods = getattr(args, "methods", METHODS).split(",")
    cache = os.path.join(args.out, "cache")
    os.makedirs(cache, exist_ok=True)
    a, b, evaluate, metric, batches, x = setup(name)
    spec = autoperm.infer_spec(a, x)
    sa, sb = a.state_dict(), b.state_dict()
    lambdas = torch.linspace(0, 1, args.points).tolist()
    rows = {}
    for method in methods:
        path = os.path.join(cache, f"{name}_{method.replace('/', '_')}_p{args.points}.pt")
        if os.path.exists(path):
            rows[method] = torch.load(path, weights_only=False)
            print(f"{name} {method}: cached", flush=True)
            continue
        if method == "naive":
            perm, sec = None, 0.0
            aligned = sb
        else:
            perm, sec = match(method, spec, a, b, batches)
            aligned = autoperm.apply_permutation(spec, perm, sb)
        t0 = time.time()
        curve = interpolation_curve(a, sa, aligned, evaluate, lambdas)
        row = {"perm": perm, "seconds": sec, "objective": objective(spec, sa, aligned),
               "curve": curve.to_dict(), "eval_seconds": time.time() - t0}
        torch.save(row, path + ".tmp")
        os.replace(path + ".tmp", path)
        rows[method] = row
        print(f"{name} {method}: {sec:.1f} s, {metric} barrier {curve.barrier(metric):.4f}, "
              f"midpoint {curve.at(metric, 0.5):.4f}", flush=True)
    return {"spec": spec, "metric": metric, "rows": rows}


def differing_rows(spec, full, shared) -> str:
    """Inner rows of the full-group result that differ from the shared result's, of all per-block rows."""
    total = diff = 0
    for d in spec.per:
        f, s = torch.as_tensor(full[d]), torch.as_tensor(shared[d])
        total += f.shape[0]
        diff += int((f != s).any(1).sum())
    return f"{diff}/{total}"


def table(results: dict) -> str:
    head = ["pair", "alignment", "loss barrier (max vs mean)", "midpoint loss", "midpoint ppl / acc",
            "endpoint loss A / B", "Σ<A,P(B)>", "matching time"]
    out = []
    for name, r in results.items():
        metric = r["metric"]
        for method, row in r["rows"].items():
            c = _curve(row["curve"])
            mid = c.at(metric, 0.5)
            extra = f"{c.at('val_ppl', 0.5):.2f}" if "val_ppl" in c.metrics else f"{100 * c.at('test_acc', 0.5):.1f} %"
            ends = f"{c[metric][0]:.3f} / {c[metric][-1]:.3f}"
            out.append([name, method, c.barrier(metric), mid, extra, ends, f"{row['objective']:.1f}",
                        "—" if method == "naive" else f"{row['seconds']:.1f} s"])
    return markdown_table(head, out)


def _curve(d: dict) -> Curve:
    import numpy as np
    return Curve(np.asarray(d["lambdas"]), {k: np.asarray(v) for k, v in d["metrics"].items()})


def main():
    args = parse_args(__doc__.splitlines()[0], "exp6", lambda p: (
        p.add_argument("--pairs", default="vit,mixtral,llama"),
        p.add_argument("--points", type=int, default=11),
        p.add_argument("--methods", default=METHODS, help="naive, weight|weight5|activation / shared|full")))
    results = {name: run_pair(name, args) for name in args.pairs.split(",")}
    print()
    md = table(results)
    print(md)
    for name, r in results.items():
        for kind in ("weight", "weight5", "activation"):
            if f"{kind}/full" not in r["rows"] or f"{kind}/shared" not in r["rows"]:
                continue
            full, shared = r["rows"][f"{kind}/full"]["perm"], r["rows"][f"{kind}/shared"]["perm"]
            print(f"{name} {kind}: per-block inner rows differing full vs shared: "
                  f"{differing_rows(r['spec'], full, shared)}")
    with open(os.path.join(args.out, "exp6.md"), "w") as f:
        f.write(md + "\n")
    save_json(os.path.join(args.out, "exp6.json"), {
        name: {m: {"curve": row["curve"], "seconds": row["seconds"], "objective": row["objective"]}
               for m, row in r["rows"].items()} for name, r in results.items()})


if __name__ == "__main__":
    main()
