"""Continuous-symmetry elements (autoperm.maps): format, random elements, folding, applying."""
import json

import pytest
import torch
from torch import nn

from autoperm import PermutationSpec
from autoperm.maps import Fold, Map, MapPin, Site, apply_transform, check_symmetries, fold_norms, random_transform, \
    transform_matrices, unfold_norms
from autoperm.maps.element import centered


class PreNormBlock(nn.Module):
    """emb -> x + fc2(relu(fc1(ln(x)))) -> ln_f -> head: a residual stream read only through LayerNorms."""

    def __init__(self, d=6, h=10, rms=False):
        super().__init__()
        self.emb = nn.Linear(3, d)
        norm = nn.RMSNorm if rms else nn.LayerNorm
        self.ln, self.fc1, self.fc2, self.ln_f, self.head = norm(d), nn.Linear(d, h), nn.Linear(h, d), norm(d), nn.Linear(d, 2)
        for p in self.parameters():
            nn.init.normal_(p, 0.0, 0.5)

    def forward(self, x):
        x = self.emb(x)
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.head(self.ln_f(x))


def stream_map(rms):
    return Map("stream", "orthogonal", 6, center=not rms,
               sites=(Site("emb.weight", 0, "primal"), Site("emb.bias", 0, "primal"),
                      Site("fc2.weight", 0, "primal"), Site("fc2.bias", 0, "primal"),
                      Site("fc1.weight", 1, "dual"), Site("head.weight", 1, "dual")),
               folds=(Fold("ln.weight", None if rms else "ln.bias", (("fc1.weight", 1, "fc1.bias"),)),
                      Fold("ln_f.weight", None if rms else "ln_f.bias", (("head.weight", 1, "head.bias"),))))


def hidden_map(kind):
    return Map("hidden", kind, 10, sites=(Site("fc1.weight", 0, "primal"), Site("fc1.bias", 0, "primal"),
                                          Site("fc2.weight", 1, "dual")))


@pytest.mark.parametrize("rms", [False, True])
def test_orthogonal_stream_through_norms_keeps_the_function(rms):
    model = PreNormBlock(rms=rms).double()
    spec = PermutationSpec.from_axes({}, {}, maps=[stream_map(rms), hidden_map("scale")])
    x = torch.randn(5, 3, dtype=torch.float64)
    assert check_symmetries(model, spec, x, seed=3) < 1e-10


def test_uncentred_rotation_of_a_layernorm_stream_changes_the_function():
    model = PreNormBlock().double()
    wrong = Map(**{**stream_map(False).__dict__, "center": False})
    spec = PermutationSpec.from_axes({}, {}, maps=[wrong])
    assert check_symmetries(model, spec, torch.randn(5, 3, dtype=torch.float64), seed=1) > 1e-3


def test_scaling_a_relu_layer_keeps_it_and_rotating_it_does_not():
    model = PreNormBlock().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert check_symmetries(model, PermutationSpec.from_axes({}, {}, maps=[hidden_map("scale")]), x) < 1e-10
    assert check_symmetries(model, PermutationSpec.from_axes({}, {}, maps=[hidden_map("orthogonal")]), x) > 1e-3


def test_fold_then_unfold_with_the_reference_restores_its_norms():
    a, b = PreNormBlock().double(), PreNormBlock().double()
    maps = [stream_map(False)]
    folded = fold_norms(maps, b.state_dict())
    assert torch.equal(folded["ln.weight"], torch.ones(6, dtype=torch.float64))
    back = unfold_norms(maps, folded, a.state_dict())
    assert torch.equal(back["ln.weight"], a.state_dict()["ln.weight"])
    x = torch.randn(4, 3, dtype=torch.float64)
    y = b(x)
    b.load_state_dict(back)
    assert torch.allclose(b(x), y, atol=1e-10)


def test_the_input_state_is_not_modified():
    model = PreNormBlock()
    sd = model.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    spec = PermutationSpec.from_axes({}, {}, maps=[stream_map(False), hidden_map("invertible")])
    apply_transform(spec, random_transform(spec, 2), sd)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


def test_centred_orthogonal_fixes_the_ones_vector():
    q = random_transform([Map("s", "orthogonal", 5, center=True)], seed=4)["s"][0]
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ torch.ones(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(centered(torch.eye(4, dtype=torch.float64)), torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_rotary_blocks_and_sites_with_strides():
    m = Map("r", "rotary", 4, blocks=2, pairs=((0, 2), (1, 3)),
            sites=(Site("q", 0, "primal", block_stride=4), Site("k", 0, "primal", offset=8, block_stride=4)))
    t = random_transform([m], seed=0)
    a = transform_matrices(m, t["r"])
    assert torch.allclose(a @ a.transpose(1, 2), torch.eye(4, dtype=torch.float64).expand(2, 4, 4), atol=1e-12)
    w = torch.randn(16, 3, dtype=torch.float64)
    out = apply_transform([m], t, {"q": w[:8], "k": w})
    q, k = out["q"].reshape(2, 4, 3), out["k"][8:].reshape(2, 4, 3)
    assert torch.allclose(q.transpose(1, 2) @ k, w[:8].reshape(2, 4, 3).transpose(1, 2) @ w[8:].reshape(2, 4, 3))
    assert torch.equal(out["k"][:8], w[:8])  # outside the sites nothing moves


def test_format_version_3_round_trip_and_older_versions_refuse_maps():
    spec = PermutationSpec.from_axes({"w": [{"g": "h"}]}, {"h": 2}, maps=[stream_map(False)],
                                     map_pins=[MapPin("h", "orthogonal", "relu between the layers")])
    d = json.loads(spec.to_json())
    assert d["version"] == 3 and d["maps"][0]["name"] == "stream"
    assert PermutationSpec.from_json(spec.to_json()) == spec
    d["version"] = 2
    with pytest.raises(ValueError, match="version 3"):
        PermutationSpec.from_json(json.dumps(d))
    plain = PermutationSpec.from_axes({"w": [{"g": "h"}]}, {"h": 2})
    assert json.loads(plain.to_json())["version"] == 1


def test_bad_values_are_refused_with_the_map_named():
    m = hidden_map("scale")
    with pytest.raises(ValueError, match="hidden"):
        transform_matrices(m, torch.ones(1, 9))
    with pytest.raises(ValueError, match="positive"):
        transform_matrices(m, -torch.ones(1, 10))
    with pytest.raises(ValueError, match="does not have"):
        apply_transform([m], {"nope": torch.ones(1, 10)}, {})
    with pytest.raises(ValueError, match="unknown kind"):
        Map("x", "shear", 3)
