"""Matching over continuous symmetries: planted elements are undone by weight and activation matching."""
import copy
import math

import pytest
import torch
from torch import nn

import autoperm
from autoperm import PermutationSpec
from autoperm.maps import Alignment, Fold, Map, Site, align_state, apply_transform, random_transform, unfold_norms

from test_maps_element import PreNormBlock


class WideBlock(PreNormBlock):
    """The pre-norm block with an 8-dimensional input, so the embedding alone pins the stream's basis."""

    def __init__(self, rms=False):
        super().__init__(rms=rms)
        self.emb = nn.Linear(8, 6)
        nn.init.normal_(self.emb.weight, 0.0, 0.5)


def block_maps(rms, hidden=True):
    stream = Map("stream", "orthogonal", 6, center=not rms,
                 sites=(Site("emb.weight", 0, "primal"), Site("emb.bias", 0, "primal"),
                        Site("fc2.weight", 0, "primal"), Site("fc2.bias", 0, "primal"),
                        Site("fc1.weight", 1, "dual"), Site("head.weight", 1, "dual")),
                 folds=(Fold("ln.weight", None if rms else "ln.bias", (("fc1.weight", 1, "fc1.bias"),)),
                        Fold("ln_f.weight", None if rms else "ln_f.bias", (("head.weight", 1, "head.bias"),))))
    scale = Map("hidden", "scale", 10, sites=(Site("fc1.weight", 0, "primal"), Site("fc1.bias", 0, "primal"),
                                              Site("fc2.weight", 1, "dual")))
    return [stream, scale] if hidden else [stream]


def block_spec(model, maps):
    s = autoperm.infer_spec(model, torch.randn(2, 8, dtype=torch.float64))
    return PermutationSpec.from_axes(s.axes, s.group_sizes, s.pinned, s.shapes, maps=maps)


def planted(spec, sa, seed, kinds, norms_from=None):
    """B: a random permutation, then a random element of the maps of ``kinds``, then other norm scales."""
    sb = apply_transform(spec, random_transform(spec, seed + 1, kinds),
                         autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed), sa))
    return unfold_norms(spec.maps, sb, norms_from) if norms_from is not None else sb


def max_err(x, y):
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in y)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("kinds", [("orthogonal",), ("orthogonal", "scale")])
def test_weight_matching_undoes_a_planted_element(rms, kinds):
    torch.manual_seed(0)
    a = WideBlock(rms=rms).double()
    spec = block_spec(a, block_maps(rms, "scale" in kinds))
    sa = a.state_dict()
    sb = planted(spec, sa, 3, kinds, WideBlock(rms=rms).double().state_dict())
    res = autoperm.weight_matching(spec, sa, sb, kinds=kinds)
    assert isinstance(res, Alignment) and set(res.transform) == {m.name for m in spec.maps}
    aligned = align_state(spec, sa, sb, res)
    assert max_err(aligned, sa) < 1e-9
    # B's own function, A's norm parameters, loadable into the same class
    b = WideBlock(rms=rms).double()
    b.load_state_dict(sb)
    back = copy.deepcopy(b)
    back.load_state_dict(aligned)
    x = torch.randn(7, 8, dtype=torch.float64)
    assert torch.allclose(back(x), b(x), atol=1e-10)


def test_activation_matching_undoes_a_planted_element():
    torch.manual_seed(1)
    a = WideBlock().double()
    spec = block_spec(a, block_maps(False))
    sa = a.state_dict()
    b = WideBlock().double()
    b.load_state_dict(planted(spec, sa, 5, ("orthogonal", "scale"), b.state_dict()))
    batches = [torch.randn(64, 8, dtype=torch.float64) for _ in range(2)]
    res = autoperm.activation_matching(spec, a, b, batches, kinds=("orthogonal", "scale"))
    assert max_err(align_state(spec, sa, b.state_dict(), res), sa) < 1e-8


class RotaryAttention(nn.Module):
    """One attention layer, 2 heads of 4 dims, RoPE on q and k (pairs (i, i + 2)), no norm."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.h, self.hd = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def rope(self, t):
        n, half = t.shape[-2], self.hd // 2
        ang = torch.arange(n, dtype=t.dtype)[:, None] * (10.0 ** -torch.arange(half, dtype=t.dtype))[None]
        c, s = ang.cos(), ang.sin()
        x1, x2 = t[..., :half], t[..., half:]
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)

    def forward(self, x):  # [B, T, d]
        B, T, _ = x.shape
        q, k, v = (f(x).view(B, T, self.h, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (self.rope(q) @ self.rope(k).transpose(-1, -2) / math.sqrt(self.hd)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(B, T, -1))


def attention_maps():
    per_head = dict(blocks=2)
    rot = Map("rot", "rotary", 4, pairs=((0, 2), (1, 3)), **per_head,
              sites=tuple(Site(f"{n}.{p}", 0, "primal", block_stride=4) for n in "qk" for p in ("weight", "bias")))
    vo = Map("vo", "orthogonal", 4, **per_head,
             sites=(Site("v.weight", 0, "primal", block_stride=4), Site("v.bias", 0, "primal", block_stride=4),
                    Site("o.weight", 1, "dual", block_stride=4)))
    return [rot, vo]


def test_rotary_and_per_head_maps_are_recovered_and_keep_the_function():
    torch.manual_seed(2)
    a = RotaryAttention().double()
    spec = PermutationSpec.from_axes({}, {}, maps=attention_maps())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    assert autoperm.maps.check_symmetries(a, spec, x, permute=False) < 1e-10
    sa = a.state_dict()
    sb = planted(spec, sa, 0, ("orthogonal", "rotary"))
    res = autoperm.weight_matching(spec, sa, sb, kinds=("orthogonal", "rotary"))
    assert max_err(align_state(spec, sa, sb, res), sa) < 1e-9
    b = RotaryAttention().double()
    b.load_state_dict(sb)
    res = autoperm.activation_matching(spec, a, b, [x], kinds=("orthogonal", "rotary"))
    assert max_err(align_state(spec, sa, sb, res), sa) < 1e-8


def test_invertible_maps_by_least_squares():
    torch.manual_seed(3)
    a = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 3)).double()
    m = Map("h", "invertible", 6, sites=(Site("0.weight", 0, "primal"), Site("0.bias", 0, "primal"),
                                         Site("1.weight", 1, "dual")))
    spec = PermutationSpec.from_axes({}, {}, maps=[m])
    sa = a.state_dict()
    sb = planted(spec, sa, 4, ("invertible",))
    res = autoperm.weight_matching(spec, sa, sb, kinds=("invertible",))
    assert max_err(align_state(spec, sa, sb, res), sa) < 1e-8
    # asked for orthogonal only, an invertible map is matched over its orthogonal subgroup
    res = autoperm.weight_matching(spec, sa, sb, kinds=("orthogonal",))
    q = res.transform["h"][0]
    assert torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_deterministic_for_a_seed_and_the_default_stays_permutations():
    torch.manual_seed(4)
    a, b = WideBlock().double(), WideBlock().double()
    spec = block_spec(a, block_maps(False))
    sa, sb = a.state_dict(), b.state_dict()
    before = {k: v.clone() for k, v in {**sa, **{"b." + k: v for k, v in sb.items()}}.items()}
    r1 = autoperm.weight_matching(spec, sa, sb, kinds=("orthogonal", "scale"), seed=7)
    align_state(spec, sa, sb, r1)
    autoperm.activation_matching(spec, a, b, [torch.randn(16, 8, dtype=torch.float64)], kinds=("orthogonal", "scale"))
    after = {**a.state_dict(), **{"b." + k: v for k, v in b.state_dict().items()}}
    assert all(torch.equal(before[k], after[k]) for k in before)  # inputs are never modified
    r2 = autoperm.weight_matching(spec, sa, sb, kinds=("orthogonal", "scale"), seed=7)
    assert all(torch.equal(r1.permutation[g], r2.permutation[g]) for g in r1.permutation)
    assert all(torch.equal(r1.transform[k], r2.transform[k]) for k in r1.transform)
    assert r1.objective == r2.objective and all(y >= x - 1e-9 * abs(x) for x, y in zip(r1.objective, r1.objective[1:]))
    plain = autoperm.weight_matching(spec, sa, sb)
    assert not isinstance(plain, Alignment) and set(plain) == set(spec.group_sizes)
    # aligning never changes B's function, whatever it found
    al = copy.deepcopy(b)
    al.load_state_dict(align_state(spec, sa, sb, r1))
    x = torch.randn(5, 8, dtype=torch.float64)
    assert torch.allclose(al(x), b(x), atol=1e-10)


def test_bad_input_is_refused_by_name():
    a = WideBlock().double()
    spec = block_spec(a, block_maps(False))
    sa = a.state_dict()
    with pytest.raises(ValueError, match="shear"):
        autoperm.weight_matching(spec, sa, sa, kinds=("shear",))
    missing = {k: v for k, v in sa.items() if k != "ln_f.weight"}
    with pytest.raises(ValueError, match="ln_f.weight"):
        autoperm.weight_matching(spec, sa, missing, kinds=("orthogonal",))
    nan = dict(sa, **{"head.weight": sa["head.weight"] * float("nan")})
    with pytest.raises(ValueError, match="head.weight"):
        autoperm.weight_matching(spec, sa, nan, kinds=("orthogonal",))
    bogus = Alignment({}, {"nope": torch.ones(1, 6)})
    with pytest.raises(ValueError, match="nope"):
        align_state(spec, sa, sa, bogus)


def test_inferred_maps_of_a_vit_planted_element_is_undone():
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=14, patch_size=7, in_chans=1,
                          num_classes=3, embed_dim=16, depth=1, num_heads=2).double()
    with torch.no_grad():
        for k, v in m.named_parameters():
            if "norm" in k:
                v.normal_(1.0 if k.endswith("weight") else 0.0, 0.3)
    x = torch.randn(2, 1, 14, 14, dtype=torch.float64)
    spec = autoperm.infer_spec(m, x, maps=("orthogonal", "invertible"))
    assert {mp.kind for mp in spec.maps} == {"orthogonal", "invertible"} and any(mp.center for mp in spec.maps)
    sa = m.state_dict()
    kinds = ("orthogonal", "invertible")
    sb = planted(spec, sa, 6, kinds)
    res = autoperm.weight_matching(spec, sa, sb, kinds=kinds)
    aligned = align_state(spec, sa, sb, res)
    assert max_err(aligned, sa) < 1e-8
    b = copy.deepcopy(m)
    b.load_state_dict(aligned)
    assert torch.allclose(b(x), m(x), atol=1e-10)


class PlainAttention(RotaryAttention):
    def rope(self, t):
        return t


def test_invertible_head_maps_from_activations_use_both_sides_of_q_k():
    torch.manual_seed(6)
    a = PlainAttention().double()
    sites = lambda n, role: tuple(Site(f"{n}.{p}", 0, role, block_stride=4) for p in ("weight", "bias"))
    qk = Map("qk", "invertible", 4, blocks=2, sites=sites("q", "primal") + sites("k", "dual"))
    vo = Map("vo", "invertible", 4, blocks=2, sites=(*sites("v", "primal"), Site("o.weight", 1, "dual", block_stride=4)))
    spec = PermutationSpec.from_axes({}, {}, maps=[qk, vo])
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    assert autoperm.maps.check_symmetries(a, spec, x, permute=False) < 1e-10
    sa = a.state_dict()
    sb = planted(spec, sa, 7, ("invertible",))
    b = PlainAttention().double()
    b.load_state_dict(sb)
    for res in (autoperm.weight_matching(spec, sa, sb, kinds=("invertible",)),
                autoperm.activation_matching(spec, a, b, [x], kinds=("invertible",))):
        assert max_err(align_state(spec, sa, sb, res), sa) < 1e-7
