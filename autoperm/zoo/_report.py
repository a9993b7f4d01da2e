"""The zoo report: totals, the models that do not pass and why, one row per model, every pin."""
from __future__ import annotations

import collections

from ._check import TOLERANCE, ZooRecord

__all__ = ["render_markdown", "totals"]


def totals(records: list[ZooRecord]) -> dict[str, int]:
    """Counts: models, families, traced, pass / fail / error / skip, and passing with unsupported ops."""
    c = collections.Counter(r.status for r in records)
    return {
        "models": len(records),
        "families": len({r.family for r in records}),
        "traced": sum(r.traced for r in records),
        "pass": c["pass"], "fail": c["fail"], "error": c["error"], "skip": c["skip"],
        "pass_with_unsupported": sum(r.status == "pass" and bool(r.unsupported) for r in records),
    }


def _err(e) -> str:
    return "n/a" if e is None else f"{e:.1e}"


def _pins(r: ZooRecord, top: int = 4) -> str:
    items = list(r.pins.items())
    text = "; ".join(f"{k} ×{v}" for k, v in items[:top])
    return text + (f"; {len(items) - top} more kinds" if len(items) > top else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _totals_table(t: dict, expected: int | None = None) -> list[str]:
    done = f"{t['models']}" + (f" of {expected}" if expected is not None else "")
    return ["| | count |", "|---|---:|",
            f"| models checked | {done} |", f"| families | {t['families']} |", f"| traced | {t['traced']} |",
            f"| pass: outputs unchanged, at least one group | {t['pass']} |",
            f"| … of which with an op that has no rule (its axes pinned) | {t['pass_with_unsupported']} |",
            f"| fail: traced, but no group or outputs changed | {t['fail']} |",
            f"| error: build, trace or inference raised, timed out or crashed | {t['error']} |",
            f"| skipped: too large | {t['skip']} |"]


def _not_passing(records: list[ZooRecord]) -> list[str]:
    bad = [r for r in records if r.status != "pass"]
    if not bad:
        return ["Every model passes."]
    out = ["| model | family | status | stage | reason |", "|---|---|---|---|---|"]
    out += [f"| {r.name} | {r.family} | {r.status} | {r.stage} | {_cell(r.reason)} |" for r in bad]
    return out


def render_markdown(records: list[ZooRecord], *, title: str, intro: str = "", full: list[ZooRecord] | None = None,
                    full_expected: int | None = None, full_note: str = "") -> str:
    """The report as markdown: totals first, then non-passing models, per-model rows and pins.

    ``full`` (records of a run over a larger set, e.g. every timm config) adds its totals and its
    non-passing models; ``full_expected`` is that set's size, so a partial run says so.
    """
    t = totals(records)
    out = [f"# {title}", "", intro, "", "## Totals", ""] + _totals_table(t) + [""]
    out += ["### Models that do not pass", ""] + _not_passing(records) + [""]
    unsupported = [r for r in records if r.status == "pass" and r.unsupported]
    if unsupported:
        out += ["### Passing models with ops that have no rule", ""]
        out += [f"- {r.name}: {'; '.join(r.unsupported[:3])}" + (" ..." if len(r.unsupported) > 3 else "")
                for r in unsupported] + [""]
    f64 = [r for r in records if r.status == "pass" and r.error_float64 is not None]
    if f64:
        out += ["### Passing models confirmed in float64", "",
                "float32 round-off alone exceeded the tolerance (deep nets, BatchNorm over a batch of 2 in train "
                "mode); the same check in float64 decided.", ""]
        out += [f"- {r.name}: {r.reason}" for r in f64] + [""]
    if full is not None:
        ft = totals(full)
        out += ["## Every registered config", "", full_note, ""] + _totals_table(ft, full_expected) + [""]
        out += ["### Configs that do not pass", ""] + _not_passing(full) + [""]
    out += ["## Per model", "",
            f"*error*: largest relative output change after a random permutation of every group (pass: at most "
            f"{TOLERANCE:g}); *train* only for models with BatchNorm. *permuted params*: fraction of parameter "
            "and buffer elements in tensors with at least one permuted axis. *pins*: pinned axes counted by "
            "reason (every one listed below).", "",
            "| model | family | status | params | traced | groups | units | permuted params | error eval "
            "| error train | time (s) | pins |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        out.append(f"| {r.name} | {r.family} | {r.status} | {r.params / 1e6:.1f}M | {'yes' if r.traced else 'no'} "
                   f"| {r.groups} | {r.units} | {r.permuted_fraction:.1%} | {_err(r.error_eval)} "
                   f"| {_err(r.error_train)} | {r.time_s:.1f} | {_cell(_pins(r))} |")
    out += ["", "## Every pinned axis, per model", "",
            "Each line: state-dict key, axis, number of indices pinned, reason (with the graph node).", ""]
    for r in records:
        if r.pinned:
            out += [f"<details><summary>{r.name}: {len(r.pinned)} pinned</summary>", "", "```"]
            out += r.pinned + ["```", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"
