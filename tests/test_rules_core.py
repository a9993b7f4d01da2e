"""One toy model per rule: the grouping (which axes are tied) and output invariance."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from rule_helpers import spec_and_error, tied_sets

TOL = 1e-5


def test_linear_chain_ties_output_to_next_input():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 2))
    spec, err = spec_and_error(m, torch.randn(3, 4))
    assert tied_sets(spec) == {
        frozenset({("0.weight", 0), ("0.bias", 0), ("2.weight", 1)}),
        frozenset({("2.weight", 0), ("2.bias", 0), ("4.weight", 1)}),
    }
    assert err < TOL


def test_inputs_and_outputs_are_pinned_with_reasons():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    spec = autoperm.infer_spec(m, torch.randn(3, 4))
    reasons = {(p.key, p.axis): p.reason for p in spec.pinned}
    assert "model input" in reasons[("0.weight", 1)]
    assert "model output" in reasons[("2.weight", 0)]


@pytest.mark.parametrize("train", [False, True])
def test_conv_batchnorm_ties_weights_and_running_stats(train):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 8, 8), train=train)
    assert tied_sets(spec) == {frozenset({
        ("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("1.running_mean", 0),
        ("1.running_var", 0), ("3.weight", 1)})}
    assert err < TOL
    assert {p.reason.split(" at ")[0] for p in spec.pinned if p.key == "0.weight" and p.axis >= 2} == {
        "convolution kernel axis"}


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv3d])
def test_conv_1d_3d(conv):
    shape = (2, 3, 6) if conv is nn.Conv1d else (2, 3, 4, 4, 4)
    m = nn.Sequential(conv(3, 6, 3, padding=1), nn.ReLU(), conv(6, 2, 1))
    spec, err = spec_and_error(m, torch.randn(*shape))
    assert [g.size for g in spec.groups] == [6]
    assert err < TOL


def test_grouped_conv_permutes_blocks_and_within_blocks():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 12, 3, groups=4, padding=1), nn.ReLU(),
                      nn.Conv2d(12, 2, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 6, 6))
    assert err < TOL
    assert spec.axes["0.weight"][0] == {"prod": [{"g": spec.axes["2.weight"][0]["prod"][0]["g"]},
                                                 {"g": spec.axes["2.weight"][1]["g"]}]}
    assert sorted(spec.group_sizes.values()) == [2, 3, 4]  # within-in, within-out, blocks


def test_depthwise_conv_shares_one_group():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.Conv2d(8, 2, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 6, 6))
    assert tied_sets(spec) == {frozenset({("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0),
                                          ("2.weight", 1)})}
    assert err < TOL


def test_transposed_conv():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, stride=2), nn.ReLU(),
                      nn.Conv2d(6, 2, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 8, 8))
    assert tied_sets(spec) == {
        frozenset({("0.weight", 0), ("0.bias", 0), ("2.weight", 0)}),
        frozenset({("2.weight", 1), ("2.bias", 0), ("4.weight", 1)}),
    }
    assert err < TOL


def test_grouped_transposed_conv():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), nn.ReLU(),
                      nn.Conv2d(6, 2, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 4, 4))
    assert err < TOL and spec.groups


class Norms(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 8), norm, nn.Linear(8, 2)

    def forward(self, x):
        return self.b(F.relu(self.norm(self.a(x))))


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.RMSNorm(8)], ids=["layernorm", "rmsnorm"])
def test_layer_and_rms_norm_follow_the_channel(norm):
    spec, err = spec_and_error(Norms(norm), torch.randn(3, 4))
    keys = {("a.weight", 0), ("a.bias", 0), ("norm.weight", 0), ("b.weight", 1)} | (
        {("norm.bias", 0)} if isinstance(norm, nn.LayerNorm) else set())
    assert tied_sets(spec) == {frozenset(keys)}
    assert err < TOL


def test_group_norm_is_block_structured():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1))
    spec, err = spec_and_error(m, torch.randn(2, 3, 4, 4))
    e = spec.axes["1.weight"][0]
    assert "prod" in e and [spec.group_sizes[x["g"]] for x in e["prod"]] == [2, 4]
    assert err < TOL


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.f1, self.f2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.f1(F.relu(x))
        x = x + self.f2(F.relu(x))
        return self.head(x)


def test_residual_add_merges_streams():
    spec, err = spec_and_error(Residual(), torch.randn(3, 4))
    stream = next(s for s in tied_sets(spec) if ("stem.weight", 0) in s)
    assert {("f1.weight", 0), ("f2.weight", 0), ("f1.weight", 1), ("head.weight", 1)} <= stream
    assert len(spec.groups) == 1
    assert err < TOL


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(8, 2, 1)
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * s * self.gamma)


def test_gating_and_layer_scale_follow_the_channel():
    spec, err = spec_and_error(SqueezeExcite(), torch.randn(2, 3, 5, 5))
    assert tied_sets(spec) == {
        frozenset({("conv.weight", 0), ("conv.bias", 0), ("fc1.weight", 1), ("fc2.weight", 0), ("fc2.bias", 0),
                   ("gamma", 0), ("out.weight", 1)}),
        frozenset({("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)}),
    }
    assert err < TOL


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 2, 1)

    def forward(self, x):
        return self.out(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1))


def test_concat_keeps_offsets():
    spec, err = spec_and_error(Concat(), torch.randn(2, 3, 4, 4))
    ga, gb = spec.axes["a.weight"][0]["g"], spec.axes["b.weight"][0]["g"]
    assert spec.axes["out.weight"][1] == {"cat": [{"g": ga}, {"g": gb}]}
    assert err < TOL


class Glu(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.a, self.b = how, nn.Linear(4, 12), nn.Linear(6, 2)

    def forward(self, x):
        h = self.a(x)
        u, v = h.chunk(2, -1) if self.how == "chunk" else h.split([6, 6], -1) if self.how == "split" else (h[:, :6], h[:, 6:])
        return self.b(u * torch.sigmoid(v))


@pytest.mark.parametrize("how", ["chunk", "split", "slice"])
def test_split_chunk_slice_cut_the_fused_axis(how):
    spec, err = spec_and_error(Glu(how), torch.randn(3, 4))
    e = spec.axes["a.weight"][0]
    assert "cat" in e and len(e["cat"]) == 2
    assert e["cat"][0] == e["cat"][1] == spec.axes["b.weight"][1]  # gate and value share the permutation
    assert err < TOL


class FlattenHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_repeats_channel_over_spatial():
    spec, err = spec_and_error(FlattenHead(), torch.randn(2, 3, 4, 4))
    g = spec.axes["conv.weight"][0]["g"]
    assert spec.axes["fc.weight"][1] == {"prod": [{"g": g}, {"fixed": 4}]}
    assert err < TOL


class Tokens(nn.Module):
    """Patch embedding, class token, positional embedding, transpose, mean pooling."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        t = t + self.fc(F.gelu(t))
        return self.head(t.permute(0, 2, 1).mean(-1))


def test_class_token_and_positional_embedding_follow_the_stream():
    spec, err = spec_and_error(Tokens(), torch.randn(2, 3, 4, 4))
    stream = next(s for s in tied_sets(spec) if ("patch.weight", 0) in s)
    assert {("cls", 2), ("pos", 2), ("fc.weight", 0), ("fc.weight", 1), ("head.weight", 1)} <= stream
    assert err < TOL


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(F.pad(F.relu(self.a(x)), (1, 1, 1, 1, 0, 2)))  # pads channels too


def test_constant_padding_of_channels_keeps_the_original_part():
    spec, err = spec_and_error(Padded(), torch.randn(2, 3, 4, 4))
    g = spec.axes["a.weight"][0]["g"]
    assert spec.axes["b.weight"][1] == {"cat": [{"g": g}, {"fixed": 2}]}
    assert err < TOL


class Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.a(x)), 2)
        h = F.interpolate(h, scale_factor=2, mode="bilinear") + F.avg_pool2d(F.adaptive_avg_pool2d(self.a(x), 4), 1)
        return self.b(h).amax((2, 3))


def test_pooling_upsampling_reductions_pass_channels():
    spec, err = spec_and_error(Pools(), torch.randn(2, 3, 4, 4))
    assert tied_sets(spec) == {frozenset({("a.weight", 0), ("a.bias", 0), ("b.weight", 1)})}
    assert err < TOL


class Embed(nn.Module):
    def __init__(self, tied):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        return self.head(h + self.fc(F.relu(h)))


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_and_tied_weights(tied):
    spec, err = spec_and_error(Embed(tied), torch.randint(0, 10, (2, 5)))
    stream = next(s for s in tied_sets(spec) if ("emb.weight", 1) in s)
    assert {("fc.weight", 0), ("fc.weight", 1), ("head.weight", 1)} <= stream
    assert spec.axes["emb.weight"][0] is None  # rows are addressed by token ids
    assert err < TOL


class Attention(nn.Module):
    def __init__(self, explicit, heads=2, dim=8, rel_bias=False):
        super().__init__()
        self.explicit, self.h, self.rel = explicit, heads, rel_bias
        self.inp, self.qkv, self.proj, self.head = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(dim, 2)
        if rel_bias:
            self.table = nn.Parameter(torch.randn(7, heads))
            self.register_buffer("index", torch.randint(0, 7, (4 * 4,)), persistent=False)

    def forward(self, x):
        b, n, _ = x.shape
        x = self.inp(x)
        q, k, v = self.qkv(x).reshape(b, n, 3, self.h, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.explicit:
            a = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            if self.rel:
                a = a + self.table[self.index].view(n, n, -1).permute(2, 0, 1)
            o = a.softmax(-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, -1))
        return self.head(x)


@pytest.mark.parametrize("explicit,rel", [(False, False), (True, False), (True, True)], ids=["sdpa", "explicit", "relbias"])
def test_attention_heads_and_head_dims_are_permutable(explicit, rel):
    spec, err = spec_and_error(Attention(explicit, rel_bias=rel), torch.randn(2, 4, 3))
    assert err < TOL
    q, k, v = spec.axes["qkv.weight"][0]["cat"]  # the fused axis is cut into q, k, v
    assert q == k  # q and k share heads and within-head dims
    heads, dims = v["prod"]
    assert q["prod"][0] == heads and q["prod"][1] != dims  # v has its own within-head permutation
    assert (spec.group_sizes[heads["g"]], spec.group_sizes[dims["g"]]) == (2, 4)
    assert spec.axes["proj.weight"][1] == v  # v and the output projection share theirs
    if rel:
        assert spec.axes["table"][1] == heads  # the bias table follows the head permutation


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(F.relu(self.b(torch.cumsum(h, -1))))


def test_position_dependent_op_pins_its_axis_with_a_reason():
    spec, err = spec_and_error(Unsupported(), torch.randn(3, 4))
    assert spec.axes["a.weight"][0] is None
    assert any("scanned axis" in p.reason and "cumsum" in p.reason for p in spec.pinned if p.key == "a.weight")
    assert tied_sets(spec) == {frozenset({("b.weight", 0), ("b.bias", 0), ("c.weight", 1)})}
    assert err < TOL


class NoRule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.special.bessel_j0(self.a(x)))


def test_op_without_rule_pins_and_is_reported():
    spec, err = spec_and_error(NoRule(), torch.randn(3, 4))
    assert spec.groups == [] and err < TOL
    assert any("no rule for aten.special_bessel_j0" in u for u in spec.unsupported)
    assert any("no rule" in p.reason for p in spec.pinned if p.key == "a.weight")


def test_register_rule_lifts_a_pin():
    from autoperm.rules import _registry

    target = torch.ops.aten.special_bessel_j0.default
    try:
        @autoperm.register_rule(target)
        def bessel(ctx, x):
            """Element-wise: out ~ x."""
            return ctx.lay(x)

        spec, err = spec_and_error(NoRule(), torch.randn(3, 4))
        assert [g.size for g in spec.groups] == [8] and err < TOL
    finally:
        _registry._RULES.pop(target, None)


class ModuleTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.shared, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.c(F.relu(self.shared(F.relu(self.shared(h)))))


def test_module_called_twice_ties_its_input_and_output():
    spec, err = spec_and_error(ModuleTwice(), torch.randn(3, 4))
    assert tied_sets(spec) == {frozenset({("a.weight", 0), ("a.bias", 0), ("shared.weight", 0), ("shared.weight", 1),
                                          ("shared.bias", 0), ("c.weight", 1)})}
    assert err < TOL


def test_multiple_inputs_and_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.h1, self.h2 = nn.Linear(3, 8), nn.Linear(5, 8), nn.Linear(8, 2), nn.Linear(8, 3)

        def forward(self, x, y):
            h = F.relu(self.a(x) + self.b(y))
            return self.h1(h), self.h2(h)

    spec, err = spec_and_error(Two(), (torch.randn(2, 3), torch.randn(2, 5)))
    assert len(spec.groups) == 1 and spec.groups[0].size == 8 and err < TOL


class ClampByTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 2)
        self.lo = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.c(torch.clamp(self.a(x), min=self.lo))


def test_clamp_by_a_tensor_ties_the_bound():
    spec, err = spec_and_error(ClampByTensor(), torch.randn(3, 4))
    assert ("lo", 0) in next(iter(tied_sets(spec)))
    assert err < TOL
