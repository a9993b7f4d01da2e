"""The linear-mode-connectivity benchmark's smoke configuration runs end to end and resumes from its cache."""
import json
import math
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
pytest.importorskip("mlxtend")
pytest.importorskip("timm")


@pytest.fixture
def suite():
    sys.path.insert(0, BENCH)
    try:
        import lmc_suite
        yield lmc_suite
    finally:
        sys.path.remove(BENCH)


def test_smoke_suite_writes_rows_doc_and_plots(suite, tmp_path):
    cache, doc, img = tmp_path / "cache", tmp_path / "lmc.md", tmp_path / "img"
    args = ["--smoke", "--cache", str(cache), "--doc", str(doc), "--img", str(img)]
    results = suite.main(args)
    assert [r["job"]["name"] for r in results] == [j["name"] for j in suite.jobs(smoke=True)]
    for r in results:
        rows = r["final"]["rows"]
        assert "naive" in rows and "weight" in rows and "activation" in rows
        for label, row in rows.items():
            for key in ("train_loss_max_mean", "test_loss_max_mean", "train_loss_midpoint", "test_loss_midpoint"):
                assert math.isfinite(row[key]), (r["job"]["name"], label, key)
            assert row["test_loss_max_mean"] >= 0  # the max includes the endpoints
            assert 0 <= row["test_acc_mid"] <= 1
    bn = next(r for r in results if r["job"]["norm"] == "bn")["final"]["rows"]
    assert {"naive + BN reset", "weight + BN reset", "weight + REPAIR"} <= set(bn)
    # the endpoints are the same models on every line of one pair
    ends = {round(row["test_loss_ends"][0], 6) for label, row in results[0]["final"]["rows"].items() if " + " not in label}
    assert len(ends) == 1
    assert results[0]["snapshots"], "the snapshot epochs are measured too"
    text = doc.read_text()
    for section in ("lmc-headline", "lmc-ln", "lmc-bn-effect", "lmc-epochs", "lmc-families", "lmc-compute"):
        assert f"<!-- {section}:start -->" in text
    assert "| w1 " in text and "naive" in text
    assert (img / "lmc_width_ln_test.png").stat().st_size > 1000
    # a rerun reads every finished pair from the cache instead of training again
    stamp = {p: os.path.getmtime(p) for p in (cache / "rows").iterdir()}
    again = suite.main(args)
    assert {p: os.path.getmtime(p) for p in (cache / "rows").iterdir()} == stamp
    assert json.dumps(again, sort_keys=True, default=float) == json.dumps(results, sort_keys=True, default=float)
