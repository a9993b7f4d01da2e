"""The zoo report: a summary page to read, with every record in full in the JSON-lines file beside it."""
import os
import re

import pytest

from autoperm.zoo import ZooRecord, read_records, render_markdown, write_records

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def _rec(name, family, status="pass", **kw):
    return ZooRecord(name, family, status, params=kw.pop("params", 10**6), traced=status != "skip",
                     groups=kw.pop("groups", 3), error_eval=1e-7, **kw)


def test_summary_page_sections_and_records_beside_it(tmp_path):
    recs = [_rec("a1", "a", pins={"model output": 2}, pinned=["head.weight:0 (4) model output at out"]),
            _rec("a2", "a", groups=7), _rec("b1", "b", "fail", stage="invariance", reason="outputs change by 0.3"),
            _rec("c1", "c", "skip", reason="too large")]
    page = render_markdown(recs, title="Zoo", intro="intro", full=recs, full_expected=5, records_path="zoo.jsonl")
    for section in ("## Totals", "### Models that do not pass", "### Pinned axes by reason", "## Every registered config",
                    "## Per family", "## Per model", "## Detail"):
        assert section in page, section
    assert "| b1 | b | fail | invariance | outputs change by 0.3 |" in page
    assert "| a | 2 | 2 | 0 | 0 | 0 | 3–7 | 1.0e-07 | a1 |" in page  # one row per family
    assert "| models checked | 4 of 5 |" in page and "head.weight:0" not in page  # pinned axes stay in the records
    write_records(recs, tmp_path / "zoo.jsonl")
    assert read_records(tmp_path / "zoo.jsonl") == recs


def test_block_structure_counted_per_model_and_in_all(tmp_path):
    """Groups per block: a column per model (per-block groups / block groups) and totals lines; records
    made before per-block groups existed (no ``per_block``) say n/a and add no totals lines."""
    vit = _rec("vit", "v", per_block=4, per={"qk0": "h0", "v0": "h0", "qk1": "h1", "v1": "h1"})
    cnn = _rec("cnn", "c", per_block=0)
    page = render_markdown([vit, cnn], title="Zoo", records_path="zoo.jsonl")
    assert "| vit | v | pass | 1.0M | yes | 3 | 4 / 2 |" in page and "| cnn | c | pass | 1.0M | yes | 3 | 0 |" in page
    assert "| groups per block of another group, in all | 4 |" in page
    assert "| block groups (each of whose blocks permutes such groups on its own), in all | 2 |" in page
    assert "| models with groups per block (attention heads, grouped convolutions, GroupNorm, experts) | 1 |" in page
    write_records([vit, cnn], tmp_path / "zoo.jsonl")
    assert read_records(tmp_path / "zoo.jsonl")[0].per == vit.per
    old = _rec("old", "o")  # per_block None
    page = render_markdown([old], title="Zoo", full=[old], full_expected=1, records_path="zoo.jsonl")
    assert "| old | o | pass | 1.0M | yes | 3 | n/a |" in page and "groups per block of another group" not in page


def test_run_zoo_writes_the_records_beside_the_page(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import autoperm.zoo as zoo

    recs = [_rec("m1", "m", pinned=["w:0 (2) model output at out"])]
    monkeypatch.setattr(zoo, "run_models", lambda entries, **kw: recs)
    zoo.run_zoo(["m1"], str(tmp_path / "mine.md"), progress=False)
    assert read_records(str(tmp_path / "mine.jsonl")) == recs
    assert "`" + str(tmp_path / "mine.jsonl") + "`" in (tmp_path / "mine.md").read_text()


@pytest.mark.parametrize("page, records", [("zoo.md", "zoo.jsonl"), ("zoo-torchvision.md", "zoo-torchvision.jsonl")])
def test_docs_pages_are_summaries_of_their_records(page, records):
    """The checked-in pages are readable (under 100 KB) and are what the report makes of their records."""
    path = os.path.join(DOCS, page)
    text = open(path, encoding="utf-8").read()
    assert os.path.getsize(path) < 100_000
    recs = read_records(os.path.join(DOCS, records))
    order = re.findall(r"^\| (\S+) \| \S+ \| \w+ \| [\d.]+M \|", text[text.index("## Per model"):], re.M)
    assert sorted(order) == sorted(r.name for r in recs)
    by_name = {r.name: r for r in recs}
    full = read_records(os.path.join(DOCS, "zoo-all.jsonl")) if "## Every registered config" in text else None
    note = text.split("## Every registered config\n\n")[1].split("\n\n|")[0] if full else ""
    made = render_markdown([by_name[n] for n in order], title="", full=full, full_expected=len(full) if full else None,
                           full_note=note, records_path=f"docs/{records}", full_path="docs/zoo-all.jsonl")
    assert text[text.index("## Totals"):] == made[made.index("## Totals"):]
