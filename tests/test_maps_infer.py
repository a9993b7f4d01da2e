"""Map inference (autoperm.maps.infer_maps) on toy modules: each kind inferred where every op commutes with it,
pinned with the op named where one does not; inferred maps keep the function (float64)."""
import pytest
import torch
from torch import nn

import autoperm
from autoperm import PermutationSpec
from autoperm.maps import Map, check_symmetries, infer_maps

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
    base = autoperm.infer_spec(mlp, x)
    assert infer_maps(mlp, x, base).maps == autoperm.infer_spec(mlp, x, maps=True).maps
    with pytest.raises(ValueError, match="other groups"):
        infer_maps(mlp, x, autoperm.infer_spec(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)), x))


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class RopeAttention(nn.Module):
    """Pre-norm single attention layer with rotate_half RoPE; ``pair_equal=False`` builds cos/sin from two
    different frequency halves, so units i and i + d/2 turn by different angles."""

    def __init__(self, c=16, heads=2, pair_equal=True, qk_norm=False):
        super().__init__()
        self.heads, self.dh = heads, c // heads
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.qn = nn.RMSNorm(self.dh) if qk_norm else nn.Identity()
        f = 1.0 / (100 ** (torch.arange(self.dh // 2, dtype=torch.float64) / (self.dh // 2)))
        self.register_buffer("f", f, persistent=False)
        self.pair_equal = pair_equal

    def forward(self, x):
        b, t, c = x.shape
        pos = torch.arange(t, dtype=x.dtype)
        fr = pos[:, None] * self.f[None, :].to(x.dtype)
        emb = torch.cat((fr, fr), -1) if self.pair_equal else torch.cat((fr, 2 * fr), -1)
        cos, sin = emb.cos(), emb.sin()
        q = self.qn(self.q(x).view(b, t, self.heads, self.dh)).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.dh).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(b, t, c))


def test_rope_pairs_take_a_rotation_per_head():
    model = RopeAttention().double()
    x = torch.randn(2, 5, 16, dtype=F64)
    spec = infer_maps(model, x, kinds=("rotary",))
    (m,) = spec.maps
    assert (m.kind, m.size, m.blocks, m.pairs[:2]) == ("rotary", 8, 2, ((0, 4), (1, 5)))
    assert {s.key for s in m.sites} == {"q.weight", "q.bias", "k.weight", "k.bias"}
    assert check_symmetries(model, spec, x, seed=5) < 1e-12
    assert PermutationSpec.from_json(spec.to_json()) == spec  # format version 3 keeps every field
    wrong = Map(m.name, "rotary", 8, 2, m.sites, pairs=tuple((2 * i, 2 * i + 1) for i in range(4)))
    assert check_symmetries(model, PermutationSpec.from_axes({}, {}, maps=[wrong]), x, seed=5, permute=False) > 1e-3


def test_rope_with_unequal_angles_in_a_pair_is_pinned():
    model = RopeAttention(pair_equal=False).double()
    spec = infer_maps(model, torch.randn(2, 5, 16, dtype=F64), kinds=("rotary",))
    assert spec.maps == []
    assert [p.kind for p in spec.map_pins] == ["rotary"] and "not proven equal" in spec.map_pins[0].reason


def test_a_norm_inside_the_head_pins_the_rotation():
    model = RopeAttention(qk_norm=True).double()
    spec = infer_maps(model, torch.randn(2, 5, 16, dtype=F64), kinds=("rotary",))
    assert spec.maps == []
    assert "qn.weight" in spec.map_pins[0].reason and "cannot fold" in spec.map_pins[0].reason


class TiedLM(nn.Module):
    """Embedding, one linear residual branch, head tied to the embedding: no norm to fold."""

    def __init__(self, v=11, c=6):
        super().__init__()
        self.emb, self.fc = nn.Embedding(v, c), nn.Linear(c, c)
        self.head = nn.Linear(c, v, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(x + self.fc(x))


def test_tied_embedding_takes_orthogonal_maps_only():
    model = TiedLM().double()
    ids = torch.randint(0, 11, (2, 5))
    spec = infer_maps(model, ids, kinds=("orthogonal", "invertible", "scale"))
    (m,) = spec.maps
    assert m.kind == "orthogonal" and m.holds == ("orthogonal",)
    assert {s.key for s in m.sites} >= {"emb.weight", "head.weight"}
    assert any(p.kind == "invertible" and "own dual" in p.reason for p in spec.map_pins)
    assert check_symmetries(model, spec, ids, seed=1) < 1e-12


def test_multihead_attention_packed_in_projection():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model, x = Self(), torch.randn(2, 5, 16, dtype=F64)
    spec = infer_maps(model, x, kinds=("orthogonal", "invertible"))
    heads = [m for m in spec.maps if m.blocks == 4]
    assert sorted(m.kind for m in heads) == ["invertible", "orthogonal"]  # v/o; q/k share the packed weight
    assert all(s.key.startswith("mha.") for m in heads for s in m.sites)
    assert check_symmetries(model, spec, x, seed=2) < 1e-12


class PostNorm(nn.Module):
    """x = norm(x + fc(x)): the norm's scale sits on the stream itself."""

    def __init__(self, c=6):
        super().__init__()
        self.inp, self.fc, self.norm, self.out = nn.Linear(3, c), nn.Linear(c, c), nn.LayerNorm(c), nn.Linear(c, 2)
        self.fc2 = nn.Linear(c, c)

    def forward(self, x):
        x = self.norm(self.inp(x))
        x = x + self.fc(x)
        return self.out(x + self.fc2(x))


def test_post_norm_stream_is_pinned_with_its_reader():
    spec = infer_maps(PostNorm(), torch.randn(4, 3))
    assert spec.maps == []
    (pin,) = [p for p in spec.map_pins if p.kind == "orthogonal"]
    assert "'norm.weight'" in pin.reason and "add" in pin.reason and "cannot fold" in pin.reason


def test_batchnorm_between_layers_blocks_scaling():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
    spec = infer_maps(net, torch.randn(3, 4))
    assert spec.maps == []
    assert any(p.kind == "scale" and "batch_norm" in p.reason for p in spec.map_pins), spec.map_pins
