"""Map inference (autoperm.maps.infer_maps) on toy modules: each kind inferred where every op commutes with it,
pinned with the op named where one does not; inferred maps keep the function (float64)."""
import pytest
import torch
from torch import nn

import autoperm
from autoperm.maps import check_symmetries, infer_maps

torch.set_num_threads(1)
F64 = torch.float64


def _maps(spec):
    return {m.name: m for m in spec.maps}


def _pins(spec, where=None):
    return [(p.kind, p.reason) for p in spec.map_pins if where is None or p.where == where]


def test_relu_hidden_units_take_positive_scalings_only():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 4, dtype=F64)
    spec = infer_maps(mlp, x, kinds=("orthogonal", "invertible", "scale"))
    (m,) = spec.maps
    assert (m.kind, m.holds) == ("scale", ("scale",))
    assert {(s.key, s.axis, s.role) for s in m.sites} == {("0.weight", 0, "primal"), ("0.bias", 0, "primal"),
                                                         ("2.weight", 1, "dual")}
    assert {k for k, _ in _pins(spec)} == {"orthogonal", "invertible"}
    assert all("relu" in r for _, r in _pins(spec))
    assert check_symmetries(mlp, spec, x, seed=2) < 1e-12


def test_gelu_blocks_every_kind_with_its_name():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    spec = infer_maps(mlp, torch.randn(3, 4))
    assert spec.maps == []
    assert _pins(spec) == [("orthogonal", "nonlinear op gelu (aten.gelu.default)"),
                           ("scale", "nonlinear op gelu (aten.gelu.default)")]


def test_a_purely_linear_space_takes_any_invertible_map():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).double()
    x = torch.randn(3, 4, dtype=F64)
    spec = infer_maps(mlp, x, kinds=("invertible",))
    (m,) = spec.maps
    assert m.kind == "invertible" and set(m.holds) == {"invertible", "orthogonal", "scale"}
    assert check_symmetries(mlp, spec, x, seed=0) < 1e-12


def test_infer_spec_opt_in_and_default_unchanged():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    assert autoperm.infer_spec(mlp, x).maps == []
    assert [m.kind for m in autoperm.infer_spec(mlp, x, maps=True).maps] == ["scale"]
    assert autoperm.infer_spec(mlp, x, maps=("orthogonal",)).maps == []
