"""Tables and plots of the linear-mode-connectivity suite, written from its per-job JSON files.

Every number in the generated blocks comes from ``<cache>/rows/*.json`` as ``lmc_suite.py``
wrote them; the blocks go between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers of the
doc, so the prose around them is kept.

    python benchmarks/lmc_report.py [rows_dir] [doc] [img_dir]
"""
from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _docs import write_section  # noqa: E402
from autoperm.barrier.report import markdown_table  # noqa: E402

NORM_NAMES = {"ln": "LayerNorm", "bn": "BatchNorm", "none": "no norm"}
NAN = float("nan")


def plot_lines(xs, series: dict, path: str, xlabel: str, ylabel: str, title: str, logy: bool = True) -> str:
    """Lines against a log2 x axis with plain tick labels and a log y axis (missing points: NaN)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    fig = Figure(figsize=(5.6, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if logy:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
HEADER = ["pair", "method", "train max", "train mid", "test max", "test mid", "test acc at ½ (ends)",
          "reduction vs naive", "matching s"]


def load(rows_dir: str) -> dict:
    out = {}
    for p in sorted(glob.glob(os.path.join(rows_dir, "*.json"))):
        with open(p) as f:
            r = json.load(f)
        out[r["job"]["name"]] = r
    return out


def _pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.0f} %"


def _row(pair: str, label: str, r: dict) -> list:
    a0, a1 = r["test_acc_ends"]
    return [pair, label, r["train_loss_max_mean"], r["train_loss_midpoint"], r["test_loss_max_mean"],
            r["test_loss_midpoint"], f"{100 * r['test_acc_mid']:.1f} % ({100 * a0:.1f}, {100 * a1:.1f})",
            "—" if label == "naive" else _pct(r["reduction_vs_naive"]),
            "—" if label.startswith("naive") else f"{r['matching_s']:.1f}"]


def _resnets(res: dict, norm: str) -> list[tuple[int, dict]]:
    js = [r for r in res.values() if r["job"]["family"] == "resnet" and r["job"]["norm"] == norm
          and not r["job"].get("only_ste")]
    return sorted(((r["job"]["width"], r) for r in js), key=lambda t: t[0])


def width_table(res: dict, norm: str) -> str:
    rows = []
    for w, r in _resnets(res, norm):
        for label, row in r["final"]["rows"].items():
            rows.append(_row(f"w{w} ({16 * w}-{64 * w} ch)", label, row))
    return markdown_table(HEADER, rows) if rows else "(no finished pair yet)"


def headline_table(res: dict) -> str:
    """Test-loss barrier (max vs mean) per width and method, one column per norm and method."""
    cols = [("ln", "naive"), ("ln", "weight"), ("ln", "activation"), ("ln", "activation + REPAIR"),
            ("bn", "naive + BN reset"), ("bn", "weight + BN reset"), ("bn", "activation + BN reset"),
            ("none", "naive"), ("none", "weight"), ("none", "activation")]
    by = {norm: dict(_resnets(res, norm)) for norm in ("ln", "bn", "none")}
    widths = sorted({w for d in by.values() for w in d})
    rows = []
    for w in widths:
        cells = [f"w{w}"]
        for norm, label in cols:
            r = by[norm].get(w)
            cells.append(r["final"]["rows"][label]["test_loss_max_mean"] if r and label in r["final"]["rows"] else "—")
        rows.append(cells)
    head = ["width"] + [f"{ {'ln': 'LN', 'bn': 'BN', 'none': 'no norm'}[n]} {m}" for n, m in cols]
    return markdown_table(head, rows) if rows else "(no finished pair yet)"


def bn_table(res: dict) -> str:
    rows = []
    for w, r in _resnets(res, "bn"):
        R = r["final"]["rows"]
        for m in ("naive", "weight", "activation"):
            if m not in R:
                continue
            as_is, reset = R[m]["test_loss_max_mean"], R[f"{m} + BN reset"]["test_loss_max_mean"]
            rep = R.get(f"{m} + REPAIR", {}).get("test_loss_max_mean", float("nan"))
            rows.append([f"w{w}", m, as_is, reset, rep if rep == rep else "—", _pct(1 - reset / as_is) if as_is > 0 else "—",
                         _pct(1 - rep / as_is) if as_is > 0 and rep == rep else "—",
                         f"{100 * R[m]['test_acc_mid']:.1f} / {100 * R[f'{m} + BN reset']['test_acc_mid']:.1f}"
                         + (f" / {100 * R[f'{m} + REPAIR']['test_acc_mid']:.1f}" if f"{m} + REPAIR" in R else "")])
    head = ["width", "method", "test barrier as is", "+ BN reset", "+ REPAIR", "removed by BN reset",
            "removed by REPAIR", "test acc at ½: as is / reset / REPAIR (%)"]
    return markdown_table(head, rows) if rows else "(no finished pair yet)"


def epoch_table(res: dict) -> tuple[str, dict]:
    r = next((r for r in res.values() if r.get("snapshots")), None)
    if r is None:
        return "(no finished pair yet)", {}
    per_epoch = {int(k): v for k, v in r["snapshots"].items()}
    per_epoch[r["job"]["epochs"]] = r["final"]["rows"]
    rows = []
    for ep in sorted(per_epoch):
        for label, row in per_epoch[ep].items():
            rows.append(_row(f"epoch {ep}", label, row))
    return markdown_table(HEADER, rows), per_epoch


def family_table(res: dict) -> str:
    rows = []
    for r in sorted((r for r in res.values() if r["job"]["family"] != "resnet"),
                    key=lambda r: (r["job"]["family"], r["job"]["width"])):
        for label, row in r["final"]["rows"].items():
            rows.append(_row(r["job"]["name"], label, row))
    return markdown_table(HEADER, rows) if rows else "(no finished pair yet)"


def ste_table(res: dict) -> str:
    rows = []
    for r in sorted((r for r in res.values() if r["job"].get("only_ste")), key=lambda r: r["job"]["width"]):
        base = res.get(r["job"]["name"].replace("-ste", ""))
        naive = base["final"]["rows"]["naive"]["test_loss_max_mean"] if base else float("nan")
        for label, row in r["final"]["rows"].items():
            row = dict(row, reduction_vs_naive=(1 - row["test_loss_max_mean"] / naive) if naive > 0 else float("nan"))
            rows.append(_row(f"LN w{r['job']['width']}", label, row))
    return markdown_table(HEADER, rows) if rows else "(no finished pair yet)"


def compute_table(res: dict) -> str:
    rows = [[name, f"{r['train_s']:.0f}", f"{r['total_s'] - r['train_s']:.0f}", f"{r['total_s']:.0f}"]
            for name, r in res.items()]
    total = sum(r["total_s"] for r in res.values())
    rows.append(["**total**", "", "", f"{total:.0f} ({total / 60:.0f} min)"])
    return markdown_table(["job", "training s", "matching + curves s", "total s"], rows)


def plots(res: dict, img: str, per_epoch: dict) -> list[str]:
    made = []
    for norm, labels in (("ln", ["naive", "weight", "activation", "weight + REPAIR", "activation + REPAIR"]),
                         ("bn", ["naive", "naive + BN reset", "weight + BN reset", "weight + REPAIR",
                                 "activation + BN reset", "activation + REPAIR"]),
                         ("none", ["naive", "weight", "activation"])):
        pairs = _resnets(res, norm)
        if not pairs:
            continue
        widths = [w for w, _ in pairs]
        for split in ("test", "train"):
            series = {lab: [r["final"]["rows"].get(lab, {}).get(f"{split}_loss_max_mean", NAN) for _, r in pairs]
                      for lab in labels if any(lab in r["final"]["rows"] for _, r in pairs)}
            made.append(plot_lines(widths, series, os.path.join(img, f"lmc_width_{norm}_{split}.png"),
                                   "width multiplier w (channels 16w-32w-64w)", f"{split}-loss barrier (max vs mean)",
                                   f"ResNet-20 layout, {NORM_NAMES[norm]}, MNIST-5k 14×14"))
    if per_epoch:
        eps = sorted(per_epoch)
        labels = [lab for lab in per_epoch[eps[-1]] if all(lab in per_epoch[e] for e in eps)]
        series = {lab: [per_epoch[e][lab]["test_loss_max_mean"] for e in eps] for lab in labels}
        made.append(plot_lines(eps, series, os.path.join(img, "lmc_epochs.png"), "epochs trained (of a 12-epoch run)",
                               "test-loss barrier (max vs mean)", "ResNet-20 layout, LayerNorm, width 4"))
        red = {lab: [100 * per_epoch[e][lab]["reduction_vs_naive"] for e in eps] for lab in labels if lab != "naive"}
        made.append(plot_lines(eps, red, os.path.join(img, "lmc_epochs_reduction.png"),
                               "epochs trained (of a 12-epoch run)", "share of the naive test-loss barrier removed (%)",
                               "ResNet-20 layout, LayerNorm, width 4", logy=False))
    big = max(_resnets(res, "ln"), default=None, key=lambda t: t[0])
    if big is not None:
        from autoperm.barrier import Curve
        from autoperm.barrier.plot import plot_curves
        import numpy as np

        curves = {k: Curve(np.array(v["lambdas"]), {m: np.array(x) for m, x in v["metrics"].items()})
                  for k, v in big[1]["final"]["curves"].items()}
        made.append(plot_curves(curves, os.path.join(img, "lmc_curves_ln_widest.png"),
                                ["train_loss", "test_loss", "test_acc"],
                                title=f"LayerNorm ResNet-20 layout, width {big[0]}"))
    return made


def write_report(rows_dir: str, doc: str, img: str) -> None:
    res = load(rows_dir)
    etab, per_epoch = epoch_table(res)
    made = plots(res, img, per_epoch)
    rel = os.path.relpath(img, os.path.dirname(os.path.abspath(doc)))
    links = "\n".join(f"![{os.path.basename(p)[:-4]}]({rel}/{os.path.basename(p)})" for p in made)
    sections = {
        "lmc-headline": headline_table(res),
        "lmc-ln": width_table(res, "ln"),
        "lmc-bn": width_table(res, "bn"),
        "lmc-bn-effect": bn_table(res),
        "lmc-none": width_table(res, "none"),
        "lmc-epochs": etab,
        "lmc-families": family_table(res),
        "lmc-ste": ste_table(res),
        "lmc-compute": compute_table(res),
        "lmc-plots": links,
    }
    for name, body in sections.items():
        write_section(doc, name, body, title="Linear mode connectivity suite")
    print(f"wrote {doc} ({len(res)} pairs) and {len(made)} plots", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    write_report(a[0] if a else os.path.expanduser("~/.cache/autoperm/lmc/rows"),
                 a[1] if len(a) > 1 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "docs", "lmc.md"),
                 a[2] if len(a) > 2 else os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "docs", "img"))
