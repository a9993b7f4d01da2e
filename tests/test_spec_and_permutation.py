"""Spec serialisation and export; permutation helpers; applying never mutates."""
import json

import pytest
import torch
from torch import nn

import autoperm
from autoperm.permutation import axis_index, validate_permutation
from autoperm.spec import PermutationSpec


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
                         nn.ReLU(), nn.Linear(6, 2))


X = torch.randn(2, 3, 6, 6)


def test_json_round_trip_is_exact():
    spec = autoperm.infer_spec(_model(), X)
    back = PermutationSpec.from_json(spec.to_json())
    assert back == spec
    assert json.loads(spec.to_json())["version"] == 1


def test_from_json_rejects_other_formats_and_versions():
    with pytest.raises(ValueError, match="not an autoperm spec"):
        PermutationSpec.from_json("{}")
    with pytest.raises(ValueError, match="version"):
        PermutationSpec.from_json(json.dumps({"format": "autoperm.spec", "version": 99}))


def test_axes_to_perm_export():
    spec = autoperm.infer_spec(_model(), X)
    perm_to_axes, axes_to_perm = spec.to_axes_to_perm()
    g = spec.axes["0.weight"][0]["g"]
    assert ("1.running_mean", 0) in perm_to_axes[g]
    assert axes_to_perm["4.weight"][1] is None  # flatten: channel x spatial is structured
    with pytest.raises(ValueError, match="4.weight:1"):
        spec.to_axes_to_perm(strict=True)


def test_inverse_and_compose_give_identity():
    spec = autoperm.infer_spec(_model(), X)
    p = autoperm.random_permutation(spec, seed=1)
    ident = autoperm.compose_permutations(p, autoperm.inverse_permutation(p))
    assert all(torch.equal(v, torch.arange(len(v))) for v in ident.values())
    sd = _model().state_dict()
    there = autoperm.apply_permutation(spec, p, sd)
    back = autoperm.apply_permutation(spec, autoperm.inverse_permutation(p), there)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_compose_matches_sequential_application():
    spec = autoperm.infer_spec(_model(), X)
    p, q = autoperm.random_permutation(spec, seed=1), autoperm.random_permutation(spec, seed=2)
    sd = _model().state_dict()
    seq = autoperm.apply_permutation(spec, q, autoperm.apply_permutation(spec, p, sd))
    once = autoperm.apply_permutation(spec, autoperm.compose_permutations(p, q), sd)
    assert all(torch.equal(seq[k], once[k]) for k in sd)


def test_apply_permutation_does_not_mutate_and_permute_model_does():
    m = _model()
    spec = autoperm.infer_spec(m, X)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = autoperm.random_permutation(spec, seed=3)
    new = autoperm.apply_permutation(spec, p, m.state_dict())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert autoperm.permute_model_(m, spec, p) is m
    assert all(torch.equal(new[k], v) for k, v in m.state_dict().items())


def test_infer_spec_does_not_mutate_the_model():
    m = _model().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    autoperm.infer_spec(m, X)
    assert m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_axis_index_product_and_concat():
    perm = {"a": torch.tensor([1, 0]), "b": torch.tensor([2, 0, 1])}
    assert axis_index({"prod": [{"g": "a"}, {"g": "b"}]}, perm).tolist() == [5, 3, 4, 2, 0, 1]
    assert axis_index({"cat": [{"g": "a"}, {"fixed": 1}, {"g": "b"}]}, perm).tolist() == [1, 0, 2, 5, 3, 4]


@pytest.mark.parametrize("bad,msg", [
    ({"g": torch.tensor([0, 1])}, "shape"),
    ({"g": torch.tensor([0, 0, 1])}, "not a permutation"),
    ({"g": torch.tensor([0.0, 1.0, 2.0])}, "integer"),
    ({}, "no entry"),
    ({"g": torch.arange(3), "h": torch.arange(2)}, "does not have"),
])
def test_bad_permutations_are_rejected_naming_the_group(bad, msg):
    spec = PermutationSpec.from_axes({"w": [{"g": "g"}]}, {"g": 3})
    with pytest.raises(ValueError, match=msg):
        validate_permutation(spec, bad)


def test_apply_permutation_names_missing_and_misshapen_keys():
    spec = autoperm.infer_spec(_model(), X)
    sd = _model().state_dict()
    p = autoperm.random_permutation(spec)
    with pytest.raises(KeyError, match="0.weight"):
        autoperm.apply_permutation(spec, p, {k: v for k, v in sd.items() if k != "0.weight"})
    with pytest.raises(ValueError, match="6.weight"):
        autoperm.apply_permutation(spec, p, {**sd, "6.weight": torch.zeros(2, 7)})


def test_axis_graph_components_are_groups():
    import networkx as nx
    g = autoperm.axis_graph(_model(), X)
    assert nx.number_connected_components(g) == 2
