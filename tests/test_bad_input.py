"""Bad input gets a clear error naming the key, group, node or op; accepted input is exact.

The cases live in ``autoperm.testing._bad_input`` so docs/reliability.md tabulates the same ones.
"""
import re

import pytest
import torch

import autoperm
from autoperm.testing._bad_input import cases, run_case, table_markdown

CASES = cases()


@pytest.mark.parametrize("case", CASES, ids=[f"{c.call.split('(')[0]}: {c.name}" for c in CASES])
def test_bad_input(case):
    err, result = run_case(case)
    if case.error is None:
        assert err is None, f"{case.name}: expected to be accepted ({case.note}), got {type(err).__name__}: {err}"
        return
    assert err is not None, f"{case.name}: no error, returned {str(result)[:200]}"
    assert isinstance(err, case.error), f"{case.name}: expected {case.error.__name__}, got {type(err).__name__}: {err}"
    assert re.search(case.match, str(err), flags=re.S), f"{case.name}: message {str(err)[:300]!r}"


def test_every_case_is_in_the_docs_table():
    table = table_markdown()
    assert all(c.name in table for c in CASES)
    assert "NO ERROR" not in table


def test_nan_weights_give_the_clean_spec():
    """A NaN weight changes no shape, so the spec equals the clean model's."""
    from autoperm.testing._bad_input import _mlp, _model_with, _nan, _x

    clean = autoperm.infer_spec(_mlp(), _x())
    assert autoperm.infer_spec(_model_with("0.weight", _nan), _x()).to_json() == clean.to_json()


def test_half_precision_spec_equals_float():
    from autoperm.testing._bad_input import _mlp, _x

    assert autoperm.infer_spec(_mlp().half(), _x().half()).axes == autoperm.infer_spec(_mlp(), _x()).axes


def test_integer_and_half_tensors_are_permuted_exactly():
    from autoperm.testing._bad_input import _mlp, _x

    m = _mlp()
    spec = autoperm.infer_spec(m, _x())
    perm = autoperm.random_permutation(spec, 3)
    ref = autoperm.apply_permutation(spec, perm, m.state_dict())
    for cast in (lambda t: (t * 1000).long(), lambda t: t.half()):
        out = autoperm.apply_permutation(spec, perm, {k: cast(v) for k, v in m.state_dict().items()})
        assert all(torch.equal(out[k], cast(ref[k])) for k in ref)


def test_nan_in_one_output_of_several_is_reported():
    """relative_difference never calls a NaN difference a match."""
    from autoperm.check import relative_difference

    a = (torch.ones(3), torch.ones(2))
    b = (torch.ones(3), torch.tensor([1.0, float("nan")]))
    assert relative_difference(a, b) == float("inf")


def test_integer_buffer_axis_is_pinned():
    from autoperm.testing._bad_input import _IntBuffer, _x

    m = _IntBuffer()
    spec = autoperm.infer_spec(m, _x())
    assert spec.group_sizes == {}  # fc1's outputs are reordered by the buffer: pinned
    assert any(p.key == "fc1.weight" and p.axis == 0 for p in spec.pinned)
    assert autoperm.check_invariance(m, spec, _x()) == 0.0


def test_register_rule_lifts_a_pin():
    """The example of docs/reliability.md section 3: sinc has no rule (pinned) until the user gives one."""
    from torch import nn

    from autoperm.rules import _registry

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2(torch.sinc(self.fc1(x)))

    net, x = Net(), torch.randn(3, 4)
    saved = dict(_registry._RULES)
    try:
        for k in (torch.ops.aten.sinc, torch.ops.aten.sinc.default):  # should a built-in rule appear one day
            _registry._RULES.pop(k, None)
        spec = autoperm.infer_spec(net, x)
        assert spec.group_sizes == {} and spec.unsupported == ["sinc: no rule for aten.sinc.default"]
        assert [p.reason for p in spec.pinned if p.key == "fc1.weight" and p.axis == 0] == [
            "no rule for aten.sinc.default at sinc (aten.sinc.default)"]

        @autoperm.register_rule("aten.sinc")
        def sinc(ctx, x):
            """Element-wise: out ~ x."""
            return ctx.lay(x)

        spec = autoperm.infer_spec(net, x)
        assert spec.group_sizes == {"fc1.weight:0": 8}
        assert autoperm.check_invariance(net, spec, x) < 1e-6
    finally:
        _registry._RULES.clear()
        _registry._RULES.update(saved)


def test_relative_difference_with_infinities():
    from autoperm.check import relative_difference

    inf = float("inf")
    assert relative_difference(torch.tensor([1.0, inf]), torch.tensor([1.0, inf])) == 0.0
    assert relative_difference(torch.tensor([2.0, inf]), torch.tensor([1.0, inf])) == 0.5
    assert relative_difference(torch.tensor([1.0, inf]), torch.tensor([inf, 1.0])) == float("inf")


def test_infinite_buffers_are_allowed():
    """Clamp bounds of ±inf (timm's clippable linears) are buffers, not a broken model."""
    class Clipped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)
            self.register_buffer("lo", torch.tensor(float("-inf")))
            self.register_buffer("hi", torch.tensor(float("inf")))

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x.clamp(self.lo, self.hi))))

    model, x = Clipped(), torch.randn(3, 4)
    assert autoperm.check_invariance(model, autoperm.infer_spec(model, x), x) < 1e-5
