"""Every model of the zoo: traced with a rule for every op, spec as snapshotted, outputs unchanged by a
random permutation, planted permutations recovered. One marker per kind: trace, snapshot, invariance, planted.

Run ``pytest model_zoo_tests -m invariance``, ``--zoo=all`` for every timm config; see conftest.py.
"""
import difflib
import json
import os
import re

import pytest

import autoperm
from autoperm.zoo import (build, has_batchnorm, invariance_errors, invariance_holds, invariance_reason,
                          planted_activation_matching, planted_weight_matching)

SNAPSHOTS = os.path.join(os.path.dirname(__file__), "snapshots")
_CACHE: dict = {}


def prepared(entry):
    """``(model, x, spec)`` for the current model, built once per worker (only the last one is kept)."""
    if entry.name not in _CACHE:
        _CACHE.clear()
        try:
            model, x = build(entry)
            _CACHE[entry.name] = (model, x, autoperm.infer_spec(model, x), None)
        except Exception as e:  # noqa: BLE001 - reported by test_trace, a skip reason elsewhere
            _CACHE[entry.name] = (None, None, None, f"{type(e).__name__}: {e}")
    return _CACHE[entry.name]


def traced(entry):
    model, x, spec, error = prepared(entry)
    if error is not None:
        pytest.skip(f"not traced (see test_trace): {error[:300]}")
    return model, x, spec


def grouped(entry):
    """``traced(entry)``, skipped when the spec has no group (test_invariance reports that)."""
    model, x, spec = traced(entry)
    if not spec.group_sizes:
        pytest.skip("no permutation group")
    return model, x, spec


@pytest.mark.trace
@pytest.mark.zoo_kind("trace")
def test_trace(entry):
    """The model exports, and every op of its graph has a rule (no axis pinned for want of one)."""
    _, _, spec, error = prepared(entry)
    assert error is None, error
    assert not spec.unsupported, f"ops without a rule: {spec.unsupported[:5]}"


@pytest.mark.snapshot
@pytest.mark.zoo_kind("snapshot")
def test_snapshot(entry):
    """Groups (names, sizes), which group is per block of which (``per``: group -> block group) and
    pinned axes (with reasons) match the checked-in snapshot."""
    _, x, spec = traced(entry)
    got = {"model": entry.name, "input_shape": list(x.shape) if hasattr(x, "shape") else None,
           "summary": spec.summary()}
    path = os.path.join(SNAPSHOTS, re.sub(r"[^\w.-]", "_", entry.name) + ".json")
    text = json.dumps(got, indent=1) + "\n"
    if os.environ.get("AUTOPERM_UPDATE_SNAPSHOTS") == "1":
        os.makedirs(SNAPSHOTS, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        return
    if not os.path.exists(path):
        pytest.skip(f"no snapshot for {entry.name} (AUTOPERM_UPDATE_SNAPSHOTS=1 writes one)")
    with open(path) as f:
        want = f.read()
    diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), "snapshot", "now", n=1))
    assert not diff, f"spec of {entry.name} changed (AUTOPERM_UPDATE_SNAPSHOTS=1 accepts it):\n{diff[:6000]}"


@pytest.mark.invariance
@pytest.mark.zoo_kind("invariance")
def test_invariance(entry):
    """At least one group; a random permutation of every group leaves outputs unchanged (eval, and train with BN).

    Where float32 round-off alone passes the tolerance (deep nets in train mode), float64 decides."""
    model, x, spec = traced(entry)
    assert spec.group_sizes, "no permutation group found"
    errors = invariance_errors(model, spec, x)
    if not invariance_holds(model, spec, x, errors)[0]:
        pytest.fail(invariance_reason(model, spec, x, errors))
    assert (errors[1] is None) == (not has_batchnorm(model))


@pytest.mark.planted
@pytest.mark.zoo_kind("planted_weight")
def test_planted_weight_matching(entry):
    """Weight matching undoes a random permutation planted in a copy of the weights."""
    model, _, spec = grouped(entry)
    assert planted_weight_matching(spec, model.state_dict()) == "recovered"


@pytest.mark.planted
@pytest.mark.zoo_kind("planted_activation")
def test_planted_activation_matching(entry):
    """Activation matching undoes a random permutation planted in a copy of the model."""
    model, x, spec = grouped(entry)
    assert planted_activation_matching(spec, model, x) == "recovered"
