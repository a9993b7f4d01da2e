"""The zoo report: a summary page to read (totals, what does not pass and why, pins by reason, one row per
model or family); every record in full, pinned axes included, stays in the JSON-lines file beside it."""
from __future__ import annotations

import collections

from ._check import TOLERANCE, ZooRecord

__all__ = ["render_markdown", "totals", "block_totals", "family_rows", "pin_reasons"]


def totals(records: list[ZooRecord]) -> dict[str, int]:
    """Counts: models, families, traced, pass / fail / error / skip, and passing with unsupported ops."""
    c = collections.Counter(r.status for r in records)
    return {
        "models": len(records),
        "families": len({r.family for r in records}),
        "traced": sum(r.traced for r in records),
        "pass": c["pass"], "fail": c["fail"], "error": c["error"], "skip": c["skip"],
        "pass_with_unsupported": sum(r.status == "pass" and bool(r.unsupported) for r in records),
        **block_totals(records),
    }


def block_totals(records: list[ZooRecord]) -> dict[str, int | None]:
    """Over the traced records: groups per block of another group, their block groups, and the models
    that have any; None each when no record says (records made before per-block groups)."""
    known = [r for r in records if r.traced and r.per_block is not None]
    if not known:
        return {"per_block": None, "block_groups": None, "models_with_blocks": None}
    return {"per_block": sum(r.per_block for r in known),
            "block_groups": sum(len(set(r.per.values())) for r in known),
            "models_with_blocks": sum(r.per_block > 0 for r in known)}


def family_rows(records: list[ZooRecord]) -> list[dict]:
    """One summary per family, by name: configs, counts by status, the group range and the
    largest eval-mode error of the passing configs, and the smallest passing config (by parameters)."""
    by_family: dict[str, list[ZooRecord]] = collections.defaultdict(list)
    for r in records:
        by_family[r.family].append(r)
    rows = []
    for fam, recs in sorted(by_family.items()):
        c = collections.Counter(r.status for r in recs)
        ok = [r for r in recs if r.status == "pass"]
        rows.append({"family": fam, "configs": len(recs), **{s: c[s] for s in ("pass", "fail", "error", "skip")},
                     "groups": (min(r.groups for r in ok), max(r.groups for r in ok)) if ok else None,
                     "error_eval": max((r.error_eval for r in ok if r.error_eval is not None), default=None),
                     "smallest_pass": min(ok, key=lambda r: (r.params, r.name)).name if ok else ""})
    return rows


def pin_reasons(records: list[ZooRecord]) -> list[tuple[str, int, int, str]]:
    """``(reason, pinned axes, models, first model)`` over ``records``, most axes first."""
    axes, models, first = collections.Counter(), collections.Counter(), {}
    for r in records:
        for kind, n in r.pins.items():
            axes[kind] += n
            models[kind] += 1
            first.setdefault(kind, r.name)
    return [(k, n, models[k], first[k]) for k, n in axes.most_common()]


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
            f"| skipped: too large | {t['skip']} |"] + ([] if t.get("per_block") is None else [
            f"| models with groups per block (attention heads, grouped convolutions, GroupNorm, experts) "
            f"| {t['models_with_blocks']} |",
            f"| groups per block of another group, in all | {t['per_block']} |",
            f"| block groups (each of whose blocks permutes such groups on its own), in all | {t['block_groups']} |"])


def _not_passing(records: list[ZooRecord]) -> list[str]:
    bad = [r for r in records if r.status != "pass"]
    if not bad:
        return ["Every model passes."]
    out = ["| model | family | status | stage | reason |", "|---|---|---|---|---|"]
    out += [f"| {r.name} | {r.family} | {r.status} | {r.stage} | {_cell(r.reason)} |" for r in bad]
    return out


def _pin_table(records: list[ZooRecord]) -> list[str]:
    rows = pin_reasons(records)
    if not rows:
        return ["No axis is pinned."]
    return (["| reason | pinned axes | models | e.g. |", "|---|---:|---:|---|"]
            + [f"| {_cell(k)} | {n} | {m} | {first} |" for k, n, m, first in rows])


def _family_table(records: list[ZooRecord]) -> list[str]:
    out = ["| family | configs | pass | fail | error | skip | groups | largest error eval | smallest passing |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f in family_rows(records):
        g = "" if f["groups"] is None else (str(f["groups"][0]) if f["groups"][0] == f["groups"][1]
                                            else f"{f['groups'][0]}–{f['groups'][1]}")
        out.append(f"| {f['family']} | {f['configs']} | {f['pass']} | {f['fail']} | {f['error']} | {f['skip']} "
                   f"| {g} | {_err(f['error_eval'])} | {f['smallest_pass']} |")
    return out


def _blocks(r: ZooRecord) -> str:
    if r.per_block is None or not r.traced:
        return "n/a"
    return f"{r.per_block} / {len(set(r.per.values()))}" if r.per_block else "0"


def _model_table(records: list[ZooRecord]) -> list[str]:
    out = [f"*error*: largest relative output change after a random permutation of every group (pass: at most "
           f"{TOLERANCE:g}); *train* only for models with BatchNorm. *per block*: groups that permute "
           "independently in every block of another group (each attention head its own head dims, each group of "
           "a grouped convolution or GroupNorm its own channels, each expert its own hidden units) / the block "
           "groups they belong to (which is which: `per` in the records). *permuted params*: fraction of "
           "parameter and buffer elements in tensors with at least one permuted axis. *pins*: pinned axes "
           "counted by reason, the four commonest.", "",
           "| model | family | status | params | traced | groups | per block | units | permuted params | error eval "
           "| error train | time (s) | pins |",
           "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in records:
        out.append(f"| {r.name} | {r.family} | {r.status} | {r.params / 1e6:.1f}M | {'yes' if r.traced else 'no'} "
                   f"| {r.groups} | {_blocks(r)} | {r.units} | {r.permuted_fraction:.1%} | {_err(r.error_eval)} "
                   f"| {_err(r.error_train)} | {r.time_s:.1f} | {_cell(_pins(r))} |")
    return out


def _detail(path: str) -> list[str]:
    return [f"Every record in full (every pinned axis with its reason and graph node, which group is per block of "
            f"which, the unsupported ops, the planted-permutation results, timings) is one JSON object per line in "
            f"`{path}`:", "",
            "```python",
            "from autoperm.zoo import read_records",
            f'records = {{r.name: r for r in read_records("{path}")}}',
            'print("\\n".join(records[NAME].pinned))   # key:axis (size) reason at node',
            "print(records[NAME].per)                   # group per block -> its block group",
            "```"]


def render_markdown(records: list[ZooRecord], *, title: str, intro: str = "", full: list[ZooRecord] | None = None,
                    full_expected: int | None = None, full_note: str = "", records_path: str | None = None,
                    full_path: str | None = None) -> str:
    """The summary page as markdown: totals, the models that do not pass (all of them), passing models
    with unruled ops or decided in float64, pinned axes by reason, and one row per model (per family
    when a family has several models). Each pinned axis stays in the records, whose file
    ``records_path`` the page names.

    ``full`` (records of a run over a larger set, e.g. every timm config, kept in ``full_path``)
    adds its totals, its non-passing configs and one row per family; ``full_expected`` is that
    set's size, so a partial run says so.

    >>> rec = ZooRecord("m", "fam", "pass", params=10**6, traced=True, groups=3, error_eval=1e-7,
    ...                 pins={"model output": 2}, per_block=2, per={"qk": "heads", "v": "heads"})
    >>> page = render_markdown([rec], title="Zoo", records_path="zoo.jsonl")
    >>> "| m | fam | pass | 1.0M | yes | 3 | 2 / 1 |" in page, "| model output | 2 | 1 | m |" in page
    (True, True)
    >>> "| groups per block of another group, in all | 2 |" in page
    True
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
    out += ["### Pinned axes by reason", "",
            "Axes no permutation may move, counted over every model, with the number of models that have them "
            "and the first such model.", ""] + _pin_table(records) + [""]
    if full is not None:
        ft = totals(full)
        out += ["## Every registered config", "", full_note, ""] + _totals_table(ft, full_expected) + [""]
        out += ["### Configs that do not pass", ""] + _not_passing(full) + [""]
        out += ["### Per family", "",
                "*groups*: fewest and most permutation groups of a passing config; *largest error eval*: over "
                "the passing configs." + (f" Each config's record is in `{full_path}`." if full_path else ""),
                ""] + _family_table(full) + [""]
    several = len({r.family for r in records}) < len(records) and len({r.family for r in records}) > 1
    if several:
        out += ["## Per family", ""] + _family_table(records) + [""]
    out += ["## Per model", ""] + _model_table(records) + [""]
    if records_path:
        out += ["## Detail", ""] + _detail(records_path)
    return "\n".join(out).rstrip() + "\n"
