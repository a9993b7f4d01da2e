"""Toy models for ops the timm zoo met without a (working) rule: amax, unfold, meshgrid, one_hot,
wrapped no-grad / autocast regions, and a reshape of a concatenation into heads x head dim."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rule_helpers import spec_and_error, tied_sets

TOL = 1e-5


class _ChannelAndSpatialMax(nn.Module):
    """CBAM-like: amax over space (channels follow) and over channels (the channel axis vanishes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 5, 1)

    def forward(self, x):
        h = self.a(x)
        gate = h.amax(dim=(2, 3), keepdim=True)  # aten.amax.default with dim / keepdim
        spatial = h.amax(dim=1, keepdim=True)  # over the permuted axis: symmetric, it vanishes
        return self.b(h * torch.sigmoid(gate) + spatial) + h.amax()


def test_amax_over_space_and_channels_keeps_the_channel_group():
    spec, err = spec_and_error(_ChannelAndSpatialMax(), torch.randn(2, 3, 6, 6))
    assert not spec.unsupported
    assert tied_sets(spec) == {frozenset({("a.weight", 0), ("a.bias", 0), ("b.weight", 1)})}
    assert err < TOL


class _Unfold(nn.Module):
    def __init__(self, size, step):
        super().__init__()
        self.size, self.step = size, step
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        h = self.a(x).unfold(2, self.size, self.step)  # (B, C, nH, W, size)
        h = (h * torch.linspace(0.5, 1.5, self.size)).sum(-1)  # position-weighted window sum
        return self.b(h.mean((2, 3)))


@pytest.mark.parametrize("size,step", [(3, 1), (2, 2), (6, 1), (1, 1)])
def test_unfold_keeps_channels_and_pins_windows(size, step):
    spec, err = spec_and_error(_Unfold(size, step), torch.randn(2, 3, 6, 5))
    assert not spec.unsupported
    assert tied_sets(spec) == {frozenset({("a.weight", 0), ("a.bias", 0), ("b.weight", 1)})}
    assert err < TOL


class _Meshgrid(nn.Module):
    def __init__(self, indexing):
        super().__init__()
        self.indexing = indexing
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.p, self.q = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.relu(self.a(x))
        g0, g1 = torch.meshgrid(self.p, self.q, indexing=self.indexing)
        if self.indexing == "ij":  # (8, 6): g0 varies along 0, g1 along 1
            h = (h.unsqueeze(-1) * g0 + g1.exp()).mean(-1)
        else:  # "xy" (6, 8): g0 varies along 1, g1 along 0
            h = (h.unsqueeze(1) * g0 + g1.exp()).mean(1)
        return self.b(h)


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_meshgrid_outputs_follow_their_inputs(indexing):
    spec, err = spec_and_error(_Meshgrid(indexing), torch.randn(3, 4))
    assert not spec.unsupported
    assert tied_sets(spec) == {
        frozenset({("a.weight", 0), ("a.bias", 0), ("p", 0), ("b.weight", 1)}),
        frozenset({("q", 0)}),  # averaged over: any permutation of q leaves the mean unchanged
    }
    assert err < TOL


class _OneHot(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 8))
        self.lin = nn.Linear(8, 2)

    def forward(self, x):
        ids = (x > 0).long() + (x > 1).long()
        return self.lin(torch.relu(F.one_hot(ids, 3).float() @ self.table))


def test_one_hot_class_axis_is_pinned_and_the_rest_follows():
    spec, err = spec_and_error(_OneHot(), torch.randn(2, 5) * 2)
    assert not spec.unsupported
    assert tied_sets(spec) == {frozenset({("table", 1), ("lin.weight", 1)})}
    assert spec.axes["table"][0] is None  # rows addressed by the ids
    assert err < TOL


class _Wrapped(nn.Module):
    def __init__(self, autocast):
        super().__init__()
        self.autocast = autocast
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.autocast:
            with torch.autocast("cpu", enabled=False):
                h = torch.relu(self.b(h))
        else:
            with torch.no_grad():
                h = torch.relu(self.b(h))
        return self.c(h)


@pytest.mark.parametrize("autocast", [False, True])
def test_wrapped_no_grad_region_is_analysed_inside(autocast):
    spec, err = spec_and_error(_Wrapped(autocast), torch.randn(3, 4))
    assert not spec.unsupported
    assert tied_sets(spec) == {
        frozenset({("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}),
        frozenset({("b.weight", 0), ("b.bias", 0), ("c.weight", 1)}),
    }
    assert err < TOL


class _CatToHeads(nn.Module):
    """CoaT's conv relative position encoding: channels split per head group [2, 3, 3] x 4, each group
    scaled on its own, concatenated, then viewed as 8 heads x 4."""

    def __init__(self, splits=(2, 3, 3), dim=4):
        super().__init__()
        self.splits, self.dim = list(splits), dim
        c = sum(splits) * dim
        self.v = nn.Linear(5, c)
        self.scales = nn.ParameterList([nn.Parameter(torch.randn(s * dim)) for s in splits])
        self.head_bias = nn.Parameter(torch.randn(sum(splits), 1))
        self.out = nn.Linear(c, 2)

    def forward(self, x):
        v = self.v(x)  # (B, N, 8 * 4)
        parts = torch.split(v, [s * self.dim for s in self.splits], dim=-1)
        v = torch.cat([p * s for p, s in zip(parts, self.scales)], dim=-1)
        h = v.reshape(x.shape[0], x.shape[1], sum(self.splits), self.dim)
        h = torch.softmax(h, dim=-1) + self.head_bias  # per head: the within-head axis is shared
        return self.out(h.reshape(x.shape[0], x.shape[1], -1))


def test_reshape_of_a_concatenation_into_heads():
    spec, err = spec_and_error(_CatToHeads(), torch.randn(2, 3, 5))
    assert not spec.unsupported
    e = spec.axes["v.weight"][0]
    heads = [part["prod"][0] for part in e["cat"]]
    inner = {part["prod"][1]["g"] for part in e["cat"]}
    assert len(inner) == 1  # one within-head permutation for every piece
    assert spec.axes["head_bias"][0] == {"cat": heads}
    (g,) = inner
    assert spec.axes["out.weight"][1] == {"prod": [{"cat": heads}, {"g": g}]}  # the same permutation as e
    assert sorted(spec.group_sizes.values()) == [2, 3, 3, 4]
    assert err < TOL


def test_reshape_of_a_concatenation_that_does_not_factor_pins():
    spec, err = spec_and_error(_CatToHeads(splits=(1, 1), dim=6), torch.randn(2, 3, 5))
    assert err < TOL  # 6 + 6 viewed as (2, 6) factors; now cut it badly: (3, 4)

    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 6), nn.Linear(5, 6)
            self.w = nn.Parameter(torch.randn(3, 1))
            self.out = nn.Linear(12, 2)

        def forward(self, x):
            h = torch.cat([self.a(x), self.b(x)], -1).reshape(*x.shape[:-1], 3, 4)
            return self.out((torch.softmax(h, -1) * self.w).flatten(-2))

    spec, err = spec_and_error(Bad(), torch.randn(2, 5))
    assert spec.axes["a.weight"][0] is None and spec.axes["b.weight"][0] is None
    assert any("cannot factor 12 as [3, 4]" in p.reason for p in spec.pinned)
    assert err < TOL


class _ZeroKeyBias(nn.Module):
    """BEiT-style qkv bias: cat(q_bias, k_bias, v_bias) with k_bias a zero non-persistent buffer; and a
    non-persistent buffer that varies along the channels (must pin them)."""

    def __init__(self, varying):
        super().__init__()
        self.varying = varying
        self.qkv, self.proj = nn.Linear(8, 24, bias=False), nn.Linear(8, 3)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, x):  # x: (N, T, 8), 2 heads of 4
        n, t, _ = x.shape
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(n, t, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, 8)
        return self.proj(out * self.scale if self.varying else out)


def test_uniform_non_persistent_buffer_does_not_pin_heads():
    spec, err = spec_and_error(_ZeroKeyBias(varying=False), torch.randn(2, 5, 8))
    assert err < TOL
    pinned = {(p.key, p.axis) for p in spec.pinned}
    assert ("qkv.weight", 0) not in pinned and ("q_bias", 0) not in pinned  # the zero k_bias pins nothing
    assert any(m.key == "q_bias" for g in spec.groups for m in g.members)


def test_varying_non_persistent_buffer_still_pins():
    spec, err = spec_and_error(_ZeroKeyBias(varying=True), torch.randn(2, 5, 8))
    assert err < TOL
    assert any(p.key == "proj.weight" and p.axis == 1 and "non-persistent" in p.reason for p in spec.pinned)


class _StageAggregate(nn.Module):
    """CoaT's head: three stage features stacked to (N, 3, C), a Conv1d(3 -> 1, kernel 1) mixing the stages;
    the conv's length axis is the channel stream, position-wise under a 1-wide kernel."""

    def __init__(self):
        super().__init__()
        self.f = nn.ModuleList(nn.Linear(4, 6) for _ in range(3))
        self.aggregate, self.head = nn.Conv1d(3, 1, kernel_size=1), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.stack([torch.relu(f(x)) for f in self.f], dim=1)  # (N, 3, 6)
        return self.head(self.aggregate(h).squeeze(1))


def test_one_wide_convolution_passes_its_length_axis_through():
    spec, err = spec_and_error(_StageAggregate(), torch.randn(2, 4))
    assert err < TOL
    assert tied_sets(spec) == {frozenset({("f.0.weight", 0), ("f.0.bias", 0), ("f.1.weight", 0), ("f.1.bias", 0),
                                          ("f.2.weight", 0), ("f.2.bias", 0), ("head.weight", 1)})}


@pytest.mark.parametrize("kw", [{"kernel_size": 3, "padding": 1}, {"kernel_size": 1, "stride": 2},
                                {"kernel_size": 1, "padding": 1}])
def test_convolution_that_moves_positions_still_pins(kw):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            out = (6 + 2 * kw.get("padding", 0) - kw["kernel_size"]) // kw.get("stride", 1) + 1
            self.a, self.conv, self.b = nn.Linear(4, 6), nn.Conv1d(2, 2, **kw), nn.Linear(out, 2)

        def forward(self, x):
            h = torch.stack([self.a(x), self.a(-x)], 1)
            return self.b(self.conv(h)).sum(1)

    spec, err = spec_and_error(M(), torch.randn(2, 4))
    assert err < TOL
    assert spec.axes["a.weight"][0] is None


class _WholeTensorTests(nn.Module):
    """gemma4_vit's encoder: ``all`` / ``any`` / ``prod`` over a whole tensor give a scalar that no permutation changes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        ok = torch.all(h >= 0) & torch.any(h > 0)
        return self.b(h) * ok.float() + torch.prod(torch.sigmoid(h))


def test_whole_tensor_all_any_prod_keep_the_group():
    spec, err = spec_and_error(_WholeTensorTests(), torch.randn(4, 3))
    assert not spec.unsupported
    assert tied_sets(spec) == {frozenset({("a.weight", 0), ("a.bias", 0), ("b.weight", 1)})}
    assert err < TOL
