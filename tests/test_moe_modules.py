"""Module groups: experts held in an ``nn.ModuleList`` move with the router's expert axis.

The move is granted only where the graph proves it (each expert selected by the routing at its own
index, identical expert graphs, a sum of their outputs); every variant that breaks one condition
keeps the expert axis fixed and stays invariant. Permutations that move modules compose, invert,
serialise and are recovered by weight and activation matching.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.io import permutation_from_dict, permutation_to_dict
from autoperm.spec import PermutationSpec
from autoperm.testing._moe import ModuleListMoE, MoEModel, _Expert, _route
from rule_helpers import spec_and_error

TOL = 1e-5
X = torch.randint(0, 32, (2, 6))


def _model(**kw):
    torch.manual_seed(0)
    model = MoEModel(style="modulelist", **kw)
    autoperm.randomize_(model, 0)
    return model.eval()


class _Variant(ModuleListMoE):
    """A ModuleList MoE whose forward breaks one condition of the module move."""

    def __init__(self, how: str):
        super().__init__(8, 4, experts=4, k=2)
        self.how = how
        if how == "unlike":  # expert 0 computes another function
            self.experts[0] = _GeluExpert(8, 4)
        if "scale" in how:
            self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        w, ids = _route(self.router, h, self.k)
        combine = (F.one_hot(ids, len(self.experts)) * w.unsqueeze(-1)).sum(1)
        out = torch.zeros_like(h)
        n = len(self.experts)
        for e, expert in enumerate(self.experts):
            if self.how == "shifted":  # expert e weighed by the routing entry of expert e + 1
                out = out + combine[:, (e + 1) % n:(e + 1) % n + 1] * expert(h)
            elif self.how == "scaled":  # a constant that depends on the index
                out = out + combine[:, e:e + 1] * expert(h) * (e + 1)
            elif self.how == "product":  # outputs multiplied, not summed
                out = (out + 1) * (combine[:, e:e + 1] * expert(h))
            elif self.how == "own scale":  # a per-expert parameter outside the list, picked at the same index
                out = out + combine[:, e:e + 1] * expert(h) * self.scale[e]
            elif self.how == "shifted scale":  # the per-expert parameter of another expert
                out = out + combine[:, e:e + 1] * expert(h) * self.scale[(e + 1) % n]
            elif self.how == "leak":  # an expert's output also read outside the sum
                y = combine[:, e:e + 1] * expert(h)
                out = out + y + (y.sum() if e == 0 else 0)
            else:
                out = out + combine[:, e:e + 1] * expert(h)
        return out.reshape(x.shape)


class _GeluExpert(_Expert):
    def forward(self, x):
        return self.down(F.gelu(self.gate(x)) * self.up(x))


def test_modulelist_toy_moves_whole_experts():
    model = _model()
    spec, err = spec_and_error(model, X)
    assert err < TOL and spec.unsupported == []
    assert spec.permuted_fraction() > 0.95
    assert spec.version == 3 and len(spec.modules) == 2
    for layer, m in enumerate(spec.modules):
        assert spec.axes[f"moes.{layer}.router.weight"][0] == {"g": m.axis}
        assert m.prefixes == tuple(f"moes.{layer}.experts.{e}." for e in range(4))
        assert len(m.local) == 1 and len(set(m.local[0])) == 4
    assert not any(p.key.startswith("moes.") for p in spec.pinned)


@pytest.mark.parametrize("how", ["shifted", "scaled", "product", "leak", "unlike", "shifted scale"])
def test_experts_not_proven_stay_in_place(how):
    torch.manual_seed(0)
    model = _Variant(how)
    autoperm.randomize_(model, 0)
    spec, err = spec_and_error(model.eval(), torch.randn(2, 3, 8))
    assert err < TOL
    assert spec.modules == []
    assert spec.axes["router.weight"][0] is None or "g" not in spec.axes["router.weight"][0]


@pytest.mark.parametrize("how", ["plain", "own scale"])
def test_plain_sum_of_experts_is_the_control(how):
    torch.manual_seed(0)
    model = _Variant(how)
    autoperm.randomize_(model, 0)
    spec, err = spec_and_error(model.eval(), torch.randn(2, 3, 8))
    assert err < TOL and len(spec.modules) == 1
    if how == "own scale":  # the per-expert scale moves with its expert
        assert spec.axes["scale"][0] == {"g": spec.modules[0].axis} == spec.axes["router.weight"][0]


def test_moves_compose_invert_and_apply_in_place():
    model = _model()
    spec = autoperm.infer_spec(model, X)
    a = model.state_dict()
    p, q = autoperm.random_permutation(spec, seed=1), autoperm.random_permutation(spec, seed=2)
    assert not torch.equal(p[spec.modules[0].axis], torch.arange(4))
    pa = autoperm.apply_permutation(spec, p, a)
    both = autoperm.apply_permutation(spec, q, pa)
    for c in (autoperm.compose_permutations(p, q, spec), autoperm.compose_permutations(p, q)):
        one = autoperm.apply_permutation(spec, c, a)
        assert all(torch.equal(one[k], both[k]) for k in a)
    back = autoperm.apply_permutation(spec, autoperm.inverse_permutation(p), pa)
    assert all(torch.equal(back[k], a[k]) for k in a)
    moved = autoperm.permute_model_(copy.deepcopy(model), spec, p).state_dict()  # slots swap in place
    assert all(torch.equal(moved[k], pa[k]) for k in a)
    assert all(torch.equal(v, a[k]) for k, v in model.state_dict().items())  # the input is not modified


def test_spec_and_permutation_files_round_trip():
    spec = autoperm.infer_spec(_model(), X)
    d = json.loads(spec.to_json())
    assert d["version"] == 3 and d["modules"][0]["prefixes"][1] == "moes.0.experts.1."
    assert PermutationSpec.from_json(spec.to_json()) == spec
    old = dict(d, version=2)
    with pytest.raises(ValueError, match="module groups"):
        PermutationSpec.from_json(json.dumps(old))
    p = autoperm.random_permutation(spec, seed=4)
    back = permutation_from_dict(json.loads(json.dumps(permutation_to_dict(p))))
    assert back.modules == p.modules
    c1, c2 = autoperm.compose_permutations(p, p, spec), autoperm.compose_permutations(back, back)
    assert all(torch.equal(c1[g], c2[g]) for g in c1)


def test_malformed_module_groups_are_rejected():
    axes = {"r": [{"g": "e"}, None], "ex.0.w": [{"g": "h0"}, None], "ex.1.w": [{"g": "h1"}, None]}
    shapes = {"r": [2, 4], "ex.0.w": [3, 4], "ex.1.w": [3, 4]}
    ok = dict(group="e", prefixes=["ex.0.", "ex.1."], local=[["h0", "h1"]])
    PermutationSpec.from_axes(axes, {"e": 2, "h0": 3, "h1": 3}, shapes=shapes, modules=[ok])
    bad = [dict(ok, prefixes=["ex.0."]),  # one module for two units
           dict(ok, local=[["h0", "h0"]]),  # a group twice
           dict(ok, local=[["h1", "h0"]]),  # a group local to the other module
           dict(ok, local=[])]  # local groups not declared: they would stay with their slot
    for m in bad:
        with pytest.raises(ValueError):
            PermutationSpec.from_axes(axes, {"e": 2, "h0": 3, "h1": 3}, shapes=shapes, modules=[m])
    with pytest.raises(ValueError):  # modules of different shapes
        PermutationSpec.from_axes(axes, {"e": 2, "h0": 3, "h1": 3}, shapes={**shapes, "ex.1.w": [3, 5]},
                                  modules=[ok])


def test_planted_element_is_recovered_by_weight_and_activation_matching():
    model = _model()
    spec = autoperm.infer_spec(model, X)
    p = autoperm.random_permutation(spec, seed=3)
    assert all(not torch.equal(p[m.axis], torch.arange(4)) for m in spec.modules)
    model_b = autoperm.permute_model_(copy.deepcopy(model), spec, p)
    a, b = model.state_dict(), model_b.state_dict()
    inv = autoperm.inverse_permutation(p)
    wm = autoperm.weight_matching(spec, a, b, progress=False)
    torch.manual_seed(1)
    am = autoperm.activation_matching(spec, model, model_b, [torch.randint(0, 32, (16, 6)) for _ in range(2)],
                                      progress=False)
    for found in (wm, am):
        assert all(torch.equal(found[g], inv[g]) for g in spec.group_sizes)
        aligned = autoperm.apply_permutation(spec, found, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_streaming_paths_refuse_module_moves(tmp_path):
    from autoperm.folder.match import stream_weight_matching
    spec = autoperm.infer_spec(_model(), X)
    with pytest.raises(NotImplementedError, match="ModuleList"):
        stream_weight_matching(spec, {}, {})


def test_the_numpy_reference_implementation_in_the_docs_moves_modules():
    import os

    import numpy as np
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "spec-format.md"), encoding="utf-8").read()
    code = next(b.split("```")[0] for b in text.split("```python")[1:] if "def apply_permutation" in b)
    ns = {}
    exec(code, ns)
    model = _model()
    spec, state = autoperm.infer_spec(model, X), model.state_dict()
    perm = autoperm.random_permutation(spec, seed=7)
    theirs = ns["apply_permutation"](json.loads(spec.to_json()), {k: v.tolist() for k, v in perm.items()},
                                     {k: v.numpy() for k, v in state.items()})
    ours = autoperm.apply_permutation(spec, perm, state)
    for k in state:
        assert np.array_equal(theirs[k], ours[k].numpy()), k


def test_ste_matching_runs_over_module_moves():
    model = _model(layers=1)
    spec = autoperm.infer_spec(model, X)
    p = autoperm.random_permutation(spec, seed=3)
    model_b = autoperm.permute_model_(copy.deepcopy(model), spec, p)

    def loss(out):
        return out.pow(2).mean()

    perm = autoperm.ste_matching(spec, model, model_b, [torch.randint(0, 32, (4, 6))], loss, steps=2, lr=1e-4,
                                  progress=False)
    aligned = autoperm.apply_permutation(spec, perm, model_b.state_dict())
    assert autoperm.check_invariance(model_b, spec, X) < TOL
    assert all(torch.equal(aligned[k], v) for k, v in model.state_dict().items())


def test_inspect_lists_module_groups():
    from autoperm.cli import format_spec
    text = format_spec(autoperm.infer_spec(_model(), X))
    assert "module groups (2;" in text and "moes.1.experts.0.* ... moes.1.experts.3.* (4)" in text
