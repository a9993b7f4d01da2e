"""Weight matching: planted permutations are recovered exactly, on every kind of group layout."""
import copy
import functools
import itertools

import pytest
import torch
from torch import nn

import autoperm
from rule_helpers import FusedAttentionNet
from autoperm.matching._costs import objective

pytestmark = pytest.mark.planted


class ConcatNet(nn.Module):
    """Two branches concatenated on channels, then a linear layer over the flattened map."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 5, 1)
        self.mix = nn.Conv2d(9, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return self.fc(torch.relu(self.mix(h)).flatten(1))


class SmallCNN(nn.Module):
    """BatchNorm, a residual connection and a grouped convolution."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12)
        self.c2, self.bn2 = nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12)
        self.c3, self.bn3 = nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.c1(x)))
        h = torch.relu(self.bn2(self.c2(h)))
        x = torch.relu(self.gn(x + self.bn3(self.c3(h))))
        return self.head(x.mean((2, 3)))


class QKNorm(nn.Module):
    """Attention with a LayerNorm over each head's dimensions on q and k (timm's qk_norm): the
    norms carry the head dimension plainly, but their outputs carry the heads on axis 1."""

    def __init__(self, dim=32, heads=8):
        super().__init__()
        self.heads = heads
        self.embed, self.out = nn.Linear(6, dim), nn.Linear(dim, 3)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm, self.k_norm = nn.LayerNorm(dim // heads), nn.LayerNorm(dim // heads)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = nn.functional.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.out((x + self.proj(y.transpose(1, 2).reshape(b, t, d))).mean(1))


class IdentityInit(nn.Module):
    """A residual stream through blocks whose first layer starts at the identity (as ConViT's value
    projection): under a wrong hidden permutation, those weights pull the stream's solve to it."""

    def __init__(self, dim=8, depth=4):
        super().__init__()
        self.embed, self.head = nn.Linear(3, dim), nn.Linear(dim, 2)
        self.inner = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.outer = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        for m in self.inner:
            nn.init.eye_(m.weight)

    def forward(self, x):
        x = self.embed(x)
        for a, b in zip(self.inner, self.outer):
            x = x + b(torch.relu(a(x)))
        return self.head(x)


class Pooled(nn.Module):
    """Linear layers after global pooling: on a batch of 2 each of their units sees 2 values."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 8, 3), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).mean((2, 3)))))


class Cancelling(nn.Module):
    """A hidden layer reading a stream with a large constant offset through weights whose rows sum
    to zero: its units' variation is comparable to the float32 round-off of the cancelling sums,
    which differs between A and a permuted copy B (their sums run in other orders)."""

    def __init__(self, offset=1e7):
        super().__init__()
        self.offset = offset
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 64), nn.Linear(64, 48), nn.Linear(48, 3)
        with torch.no_grad():
            self.fc2.weight.sub_(self.fc2.weight.mean(1, keepdim=True))

    def forward(self, x):
        return self.fc3(self.fc2(torch.relu(self.fc1(x)) + self.offset))


class AdditiveAttention(nn.Module):
    """SwiftFormer's efficient additive attention: the module holds ``w_g`` on the query's group
    itself, but returns its ``final`` projection, on the residual stream's (of the same size)."""

    def __init__(self, dim=8):
        super().__init__()
        self.to_query, self.final = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.w_g = nn.Parameter(torch.randn(dim, 1))

    def forward(self, x):
        q = nn.functional.normalize(self.to_query(x), dim=-1)
        a = nn.functional.normalize(q @ self.w_g, dim=1)
        return self.final((a * q).sum(1, keepdim=True) * q + q)


class Additive(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.embed, self.attn, self.out = nn.Linear(6, dim), AdditiveAttention(dim), nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.out((x + self.attn(x)).mean(1))


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)), torch.randn(2, 5)


def _vit():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5)
    return m, torch.randn(1, 3, 32, 32)


MODELS = {
    "mlp": _mlp,
    "cnn": lambda: (SmallCNN(), torch.randn(2, 3, 8, 8)),
    "concat": lambda: (ConcatNet(), torch.randn(2, 3, 4, 4)),
    "attention": lambda: (FusedAttentionNet(), torch.randn(2, 5, 6)),
    "vit": _vit,
    "identity_init": lambda: (IdentityInit(), torch.randn(2, 3)),
    "pooled": lambda: (Pooled(), torch.randn(2, 3, 6, 6)),
    "qk_norm": lambda: (QKNorm(), torch.randn(2, 5, 6)),
    "additive": lambda: (Additive(), torch.randn(2, 5, 6)),
}


@functools.lru_cache(maxsize=None)
def planted(name, seed=0):
    """(spec, A, B, planted permutation, model, example input) with B = A permuted at random.

    Cached: tests must not modify what they get (the no-mutation checks would catch it)."""
    torch.manual_seed(seed)
    model, x = MODELS[name]()
    autoperm.randomize_(model, seed).eval()
    spec = autoperm.infer_spec(model, x)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    p = autoperm.random_permutation(spec, seed=seed + 1)
    return spec, a, autoperm.apply_permutation(spec, p, a), p, model, x


@pytest.mark.parametrize("name", list(MODELS))
def test_weight_matching_recovers_planted_permutation(name):
    spec, a, b, p, *_ = planted(name)
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    perm = autoperm.weight_matching(spec, a, b, progress=False)
    assert set(perm) == set(spec.group_sizes)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)
    aligned = autoperm.apply_permutation(spec, perm, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    assert all(torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k]) for k in a)  # inputs untouched


def test_weight_matching_structures_are_exercised():
    spec = planted("attention")[0]
    kinds = {k for ex in spec.axes.values() for e in ex if e for k in e}
    assert {"cat", "prod"} <= kinds
    spec = planted("cnn")[0]
    assert any(e and "prod" in e for ex in spec.axes.values() for e in ex)


def test_weight_matching_deterministic_and_restarts():
    spec, a, _, _, model, _ = planted("cnn")
    other = copy.deepcopy(model)
    autoperm.randomize_(other, seed=7, scale=3.0)
    b = other.state_dict()
    p1 = autoperm.weight_matching(spec, a, b, seed=3, progress=False)
    p2 = autoperm.weight_matching(spec, a, b, seed=3, progress=False)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)
    best = autoperm.weight_matching(spec, a, b, seed=3, restarts=3, progress=False)
    assert objective(spec, a, b, best) >= objective(spec, a, b, p1) - 1e-9


def test_weight_matching_beats_identity_and_brute_force_on_one_group():
    torch.manual_seed(0)
    ma, mb = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    spec = autoperm.infer_spec(ma, torch.randn(1, 3))
    a, b = ma.state_dict(), mb.state_dict()
    (g,) = spec.group_sizes
    perm = autoperm.weight_matching(spec, a, b, progress=False)
    best = max(objective(spec, a, b, {g: torch.tensor(q)}) for q in itertools.permutations(range(5)))
    assert objective(spec, a, b, perm) == pytest.approx(best, rel=1e-9)
    assert objective(spec, a, b, perm) >= objective(spec, a, b, autoperm.identity_permutation(spec))


def test_weight_matching_objective_not_below_identity():
    spec, a, _, _, model, _ = planted("attention")
    other = copy.deepcopy(model)
    autoperm.randomize_(other, seed=5, scale=2.0)
    b = other.state_dict()
    perm = autoperm.weight_matching(spec, a, b, progress=False)
    assert objective(spec, a, b, perm) >= objective(spec, a, b, autoperm.identity_permutation(spec))


def test_weight_matching_init_is_a_start_point():
    spec, a, b, p, *_ = planted("mlp")
    inv = autoperm.inverse_permutation(p)
    perm = autoperm.weight_matching(spec, a, b, init=inv, max_iter=1, progress=False)
    assert all(torch.equal(perm[g], inv[g]) for g in inv)


@pytest.mark.parametrize("breakage, match", [
    (lambda s, k: s.pop(k), "no key"),
    (lambda s, k: s.__setitem__(k, s[k][:1]), "shape"),
    (lambda s, k: s.__setitem__(k, s[k].long()), "floating"),
    (lambda s, k: s.__setitem__(k, s[k].clone().fill_(float("nan"))), "NaN"),
    (lambda s, k: s.__setitem__(k, s[k].clone().fill_(float("inf"))), "infinite"),
])
def test_weight_matching_validates_inputs(breakage, match):
    spec, a, b, *_ = planted("mlp")
    key = "0.weight"
    bad = dict(b)
    breakage(bad, key)
    with pytest.raises(ValueError, match=match) as info:
        autoperm.weight_matching(spec, a, bad, progress=False)
    assert key in str(info.value)
    with pytest.raises(ValueError, match="permutation"):
        autoperm.weight_matching(spec, a, b, init={"nope": torch.arange(3)}, progress=False)


def _model_b(model, state):
    other = copy.deepcopy(model)
    other.load_state_dict(state)
    return other


@pytest.mark.parametrize("name", list(MODELS))
def test_activation_matching_recovers_planted_permutation(name):
    spec, a, b, p, model, x = planted(name)
    model_b = _model_b(model, b)
    batches = [torch.randn(8, *x.shape[1:]) for _ in range(2)]
    perm = autoperm.activation_matching(spec, model, model_b, batches, progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)
    assert all(torch.equal(model.state_dict()[k], a[k]) and torch.equal(model_b.state_dict()[k], b[k]) for k in a)


def test_activation_matching_ties_fall_back_to_weights():
    spec, a, b, p, model, x = planted("pooled")  # batch of 2: fc1's correlations are all ±1
    perm = autoperm.activation_matching(spec, model, _model_b(model, b), [x], progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)


def test_activation_sites_cover_plain_groups():
    spec, _, _, _, model, _ = planted("mlp")
    assert sorted(autoperm.matching.activation_sites(spec, model).values()) == sorted(spec.group_sizes)


def test_activation_sites_skip_groups_inside_a_product_with_another():
    spec, _, _, _, model, _ = planted("qk_norm")  # q_norm's rows mix heads, which B orders differently
    sites = autoperm.matching.activation_sites(spec, model)
    assert "q_norm" not in sites and "k_norm" not in sites and "embed" in sites



def test_activation_sites_skip_modules_with_parameterized_submodules():
    spec, _, _, _, model, _ = planted("additive")  # attn holds w_g (the query's group), returns final's output
    sites = autoperm.matching.activation_sites(spec, model)
    assert "attn" not in sites and sites["attn.to_query"] == "attn.w_g:0" and sites["attn.final"] == sites["embed"]

def test_activation_matching_correlation_beats_identity_on_a_noisy_copy():
    spec, a, b, p, model, x = planted("mlp")
    noisy = {k: v + 0.05 * torch.randn_like(v) for k, v in b.items()}
    perm = autoperm.activation_matching(spec, model, _model_b(model, noisy), [torch.randn(256, 5)], progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_ste_matching_recovers_planted_permutation(name):
    spec, a, b, p, model, x = planted(name)
    model_b = _model_b(model, b)
    classes = model(x).shape[-1]
    batches = [(torch.randn(8, *x.shape[1:]), torch.randint(0, classes, (8,))) for _ in range(2)]
    perm = autoperm.ste_matching(spec, model, model_b, batches, nn.functional.cross_entropy, steps=3, lr=1e-3,
                                 progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)
    assert all(torch.equal(model.state_dict()[k], a[k]) for k in a)


def test_ste_matching_lowers_the_midpoint_loss():
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    ma, mb = make(), make()
    spec = autoperm.infer_spec(ma, torch.randn(1, 4))
    x, y = torch.randn(128, 4), torch.randint(0, 3, (128,))
    perm = autoperm.ste_matching(spec, ma, mb, [(x, y)], nn.functional.cross_entropy, steps=20, lr=0.05, progress=False)
    wm = autoperm.weight_matching(spec, ma.state_dict(), mb.state_dict(), progress=False)

    def midpoint_loss(p):
        aligned = autoperm.apply_permutation(spec, p, mb.state_dict())
        mid = {k: 0.5 * (ma.state_dict()[k] + aligned[k]) for k in aligned}
        return float(nn.functional.cross_entropy(torch.func.functional_call(ma, mid, (x,)), y))

    assert midpoint_loss(perm) <= midpoint_loss(wm) + 1e-6


def test_activation_matching_round_off_limited_groups_fall_back_to_weights():
    torch.manual_seed(0)
    model = Cancelling().eval()
    spec = autoperm.infer_spec(model, torch.randn(2, 4))
    p = autoperm.random_permutation(spec, seed=1)
    perm = autoperm.activation_matching(spec, model, _model_b(model, autoperm.apply_permutation(spec, p, model.state_dict())),
                                        [torch.randn(32, 4)], progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)


def test_activation_matching_with_a_single_sample():
    spec, a, b, p, model, x = planted("mlp")  # one sample: every unit is constant, matched by value
    perm = autoperm.activation_matching(spec, model, _model_b(model, b), [torch.randn(1, 5)], progress=False)
    inv = autoperm.inverse_permutation(p)
    assert all(torch.equal(perm[g], inv[g]) for g in spec.group_sizes)


@pytest.mark.parametrize("offset", [0.0, -1e3, 1e6])
def test_assignment_solver_is_exact_with_and_without_lap(offset, monkeypatch):
    """Row-reduced LAPJV and the scipy fallback both reach the brute-force optimum, whatever the rows' offsets."""
    import numpy as np

    from autoperm.matching import _lap

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 6):
        cost = rng.standard_normal((n, n)) + offset * rng.random((n, 1))
        best = max(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        for solver in (_lap._lap, None):
            monkeypatch.setattr(_lap, "_lap", solver)
            p = _lap.solve_numpy(cost)
            assert sorted(p.tolist()) == list(range(n))
            assert abs(cost[np.arange(n), p].sum() - best) <= 1e-9 * max(1.0, abs(best))
