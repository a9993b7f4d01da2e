"""Barrier evaluation: interpolation, barrier definitions, BN reset, REPAIR, layer-wise curves."""
import copy
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import autoperm
from autoperm.barrier import (
    BARRIER_KINDS, Curve, Repair, barrier_height, evaluator, interpolate_states, interpolation_curve,
    layer_groups, layerwise_barriers, layerwise_curves, relative_reduction, reset_bn_stats,
)


def _clone(state):
    return {k: v.clone() for k, v in state.items()}


def _assert_same(s1, s2):
    assert set(s1) == set(s2)
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k


class _Point(nn.Module):
    """A 'model' that is just a parameter vector θ; the loss is evaluated on it directly."""

    def __init__(self, d):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, dtype=torch.float64))


# -- barrier definitions ------------------------------------------------------------------

def test_quadratic_midpoint_identity():
    """For L(θ) = ½(θ−c)ᵀH(θ−c) + k, the midpoint barrier is exactly −⅛ ΔᵀHΔ, Δ = θ_B − θ_A.

    Sign convention (autoperm.barrier.metrics): barrier = curve − endpoints, so a convex basin
    (H positive definite) gives a negative midpoint value and a ridge (ΔᵀHΔ < 0) a positive one.
    On the 25-point grid, which contains λ = ½, ``max_linear`` is exactly max(0, −⅛ ΔᵀHΔ), since
    f(λ) − linear = −½ λ(1−λ) ΔᵀHΔ.
    """
    gen = torch.Generator().manual_seed(0)
    d = 12
    for trial in range(6):
        m = torch.randn(d, d, generator=gen, dtype=torch.float64)
        h = m + m.T if trial % 2 else m @ m.T  # indefinite, then positive definite
        c, k = torch.randn(d, generator=gen, dtype=torch.float64), 0.7
        a, b = torch.randn(d, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)

        def loss(model):
            r = model.theta - c
            return float(0.5 * r @ h @ r + k)

        curve = interpolation_curve(_Point(d), {"theta": a}, {"theta": b}, loss)
        q = float((b - a) @ h @ (b - a))
        assert curve.barrier("loss", "midpoint") == pytest.approx(-q / 8, rel=1e-9, abs=1e-9)
        assert curve.barrier("loss", "max_linear") == pytest.approx(max(0.0, -q / 8), rel=1e-9, abs=1e-9)
        if trial % 2 == 0:
            assert curve.barrier("loss", "midpoint") < 0  # convex: the path dips below the ends


def test_barrier_definitions_on_known_curves():
    lam = [0.0, 0.25, 0.5, 0.75, 1.0]
    f = [1.0, 2.0, 1.5, 3.5, 3.0]
    assert barrier_height(f, lam, "max_mean") == pytest.approx(3.5 - 2.0)
    assert barrier_height(f, lam, "max_linear") == pytest.approx(3.5 - 2.5)
    assert barrier_height(f, lam, "midpoint") == pytest.approx(1.5 - 2.0)
    # max_mean ≥ max_linear ≥ 0 is not general, but both are ≥ 0 on a grid with both ends
    for g in ([0.0, -1.0, 0.0, -1.0, 0.0], [5.0, 1.0, 1.0, 1.0, 0.0]):
        assert barrier_height(g, lam, "max_mean") >= 0 and barrier_height(g, lam, "max_linear") >= 0
    with pytest.raises(ValueError, match="λ = 0.5"):
        barrier_height([0, 1, 2, 3], [0, 0.3, 0.6, 1], "midpoint")
    with pytest.raises(ValueError, match="start at 0"):
        barrier_height([0, 1], [0.1, 1])
    with pytest.raises(ValueError, match="unknown barrier kind"):
        barrier_height([0, 1], kind="peak")
    assert relative_reduction(0.05, 1.0) == pytest.approx(0.95)
    assert np.isnan(relative_reduction(0.1, 0.0))


def test_curve_errors_and_barriers_table():
    c = Curve(np.array([0.0, 0.5, 1.0]), {"test_loss": np.array([0.2, 1.0, 0.4]), "test_acc": np.array([0.9, 0.6, 0.8])})
    assert np.allclose(c["test_error"], [0.1, 0.4, 0.2])
    table = c.barriers()
    assert set(table) == {(m, k) for m in ("test_loss", "test_error") for k in BARRIER_KINDS}
    assert table[("test_error", "midpoint")] == pytest.approx(0.25)
    assert c.at("test_loss", 0.5) == 1.0
    with pytest.raises(KeyError):
        c["train_loss"]


# -- the Git Re-Basin counterexample --------------------------------------------------------

def _counterexample_state(w0, b0, w1, b1):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    # the paper's code writes Dense kernels as (in, out); torch's Linear weight is (out, in)
    return {"0.weight": t(w0).T.contiguous(), "0.bias": t(b0), "2.weight": t(w1).T.contiguous(), "2.bias": t(b1),
            "4.weight": t([[-1.0, -1.0]]), "4.bias": t([0.0])}


def test_git_rebasin_counterexample_no_permutation_connects():
    """Two global optima that no permutation makes linearly connected (Git Re-Basin, section 6).

    The construction is the one in the authors' code (``src/sgd_is_special.py``): inputs uniform
    on [−1, 1]², label 1 iff both coordinates are ≥ 0, predicted 1 iff the output is ≥ 0; the net
    is Linear(2, 2) → leaky ReLU(0.01) → Linear(2, 2) → leaky ReLU(0.01) → Linear(2, 1). Model A
    computes roughly −lrelu(−x₁) − lrelu(lrelu(−x₂)); model B routes x₁ and x₂ through the other
    units with the opposite signs. Both classify (almost) every point correctly. The hidden layers
    have two units each, so there are 2!·2! = 4 permutations of B; the spec must find exactly these
    two groups, and every one of the 4 paths misclassifies about a quarter of the square
    (a whole quadrant) at its midpoint.
    """
    net = nn.Sequential(nn.Linear(2, 2), nn.LeakyReLU(0.01), nn.Linear(2, 2), nn.LeakyReLU(0.01), nn.Linear(2, 1))
    a = _counterexample_state([[1, 0], [0, -1]], [1, 0], [[-1, 0], [0, 1]], [1, 0])
    b = _counterexample_state([[-1, 0], [0, 1]], [0, 1], [[1, 0], [0, -1]], [0, 1])
    spec = autoperm.infer_spec(net, torch.randn(3, 2))
    assert sorted(spec.group_sizes.values()) == [2, 2]

    x = torch.rand(4096, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = (x[:, 0] >= 0) & (x[:, 1] >= 0)

    def accuracy(model):
        return {"acc": float(((model(x).squeeze(1) >= 0) == y).float().mean())}

    names = list(spec.group_sizes)
    all_perms = itertools.product(*(itertools.permutations(range(s)) for s in spec.group_sizes.values()))
    barriers = []
    for ps in all_perms:
        perm = {n: torch.tensor(p) for n, p in zip(names, ps)}
        curve = interpolation_curve(net, a, autoperm.apply_permutation(spec, perm, b), accuracy)
        assert curve.error[0] < 0.01 and curve.error[-1] < 0.01  # both ends are (near) perfect
        barriers.append(curve.barrier("error", "max_mean"))
        assert curve.barrier("error", "midpoint") > 0.2
    assert len(barriers) == 4 and min(barriers) > 0.2


# -- interpolation and its inputs ---------------------------------------------------------

def _bn_net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _trained_bn_state(seed):
    torch.manual_seed(seed)
    net = _bn_net()
    autoperm.randomize_(net, seed)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 1, 6, 6) * (1 + seed))
    return net, _clone(net.state_dict())


def test_interpolation_leaves_integer_buffers_alone():
    net_a, a = _trained_bn_state(0)
    _, b = _trained_bn_state(1)
    b["1.num_batches_tracked"] = torch.tensor(1000)
    for lam in (0.0, 0.3, 1.0):
        s = interpolate_states(a, b, lam)
        assert s["1.num_batches_tracked"].dtype == torch.int64
        assert s["1.num_batches_tracked"].item() == a["1.num_batches_tracked"].item()
        assert torch.allclose(s["0.weight"], (1 - lam) * a["0.weight"] + lam * b["0.weight"])
    assert torch.equal(interpolate_states(a, b, 1.0)["1.running_var"], b["1.running_var"])
    with pytest.raises(KeyError):
        interpolate_states(a, {k: v for k, v in b.items() if k != "0.bias"}, 0.5)
    held = interpolate_states(a, b, 0.5, keys={"5.weight"})
    assert torch.equal(held["0.weight"], a["0.weight"]) and not torch.equal(held["5.weight"], a["5.weight"])


def test_bn_reset_changes_running_stats_not_weights():
    net, state = _trained_bn_state(0)
    x = torch.randn(64, 1, 6, 6) * 3 + 1
    reset_bn_stats(net, [x[:32], (x[32:], None)])
    after = net.state_dict()
    for k in state:
        if k.endswith(("running_mean", "running_var")):
            assert not torch.allclose(after[k], state[k]), k
        elif k.endswith("num_batches_tracked"):
            assert after[k].item() == 2
        else:
            assert torch.equal(after[k], state[k]), k
    assert net.training  # the mode is restored
    # the statistics are those of the data: the conv output's per-channel mean over both batches
    with torch.no_grad():
        assert torch.allclose(after["1.running_mean"], net[0](x).mean((0, 2, 3)), atol=1e-5)


def test_interpolation_curve_does_not_modify_its_inputs():
    net, a = _trained_bn_state(0)
    _, b = _trained_bn_state(1)
    a0, b0, net0 = _clone(a), _clone(b), _clone(net.state_dict())
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    batches = [x[:16], x[16:]]
    curve = interpolation_curve(net, a, b, evaluator((x, y)), lambdas=[0, 0.5, 1], reset_bn=batches, repair=batches)
    assert curve.loss.shape == (3,) and np.all(np.isfinite(curve.loss))
    _assert_same(a, a0)
    _assert_same(b, b0)
    _assert_same(net.state_dict(), net0)
    assert x.shape == (32, 1, 6, 6)


def test_curve_endpoints_are_the_models_themselves():
    torch.manual_seed(0)
    mlp_a = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    mlp_b = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(50, 5), torch.randint(0, 3, (50,))
    ev = evaluator({"train": (x, y), "test": (x[:20], y[:20])})
    curve = interpolation_curve(mlp_a, mlp_a.state_dict(), mlp_b.state_dict(), ev)
    assert len(curve.lambdas) == 25 and set(curve.metrics) == {"train_loss", "train_acc", "test_loss", "test_acc"}
    assert curve["train_loss"][0] == pytest.approx(ev(mlp_a)["train_loss"])
    assert curve["test_acc"][-1] == pytest.approx(ev(mlp_b)["test_acc"])


def test_evaluate_result_forms():
    net = nn.Linear(1, 1)
    s = net.state_dict()
    assert set(interpolation_curve(net, s, s, lambda m: (1.0, 0.5), lambdas=[0, 1]).metrics) == {"loss", "acc"}
    assert set(interpolation_curve(net, s, s, lambda m: 2.0, lambdas=[0, 1]).metrics) == {"loss"}


# -- REPAIR ------------------------------------------------------------------------------

def _channel_stats(net, x, upto):
    with torch.no_grad():
        h = net[: upto + 1](x)
    return h.mean(0), h.std(0, unbiased=False)


def test_repair_sets_interpolated_channel_statistics():
    torch.manual_seed(0)
    net_a = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    net_b = copy.deepcopy(net_a)
    autoperm.randomize_(net_b, seed=1, scale=1.0)
    a, b = net_a.state_dict(), net_b.state_dict()
    x = torch.randn(256, 6)
    rep = Repair(net_a, a, b, [x])
    assert rep.modules == ["0", "2"]  # the head is not repaired
    lam = 0.5
    work = copy.deepcopy(net_a)
    work.load_state_dict(interpolate_states(a, b, lam))
    rep(work, lam)
    for i, name in ((0, "0"), (2, "2")):
        ma, sa = _channel_stats(net_a, x, i)
        mb, sb = _channel_stats(net_b, x, i)
        m, s = _channel_stats(work, x, i)
        assert torch.allclose(m, (ma + mb) / 2, atol=1e-4)
        assert torch.allclose(s, (sa + sb) / 2, atol=1e-4)
    # at λ = 0 REPAIR leaves model A's function as it was
    work0 = copy.deepcopy(net_a)
    rep(work0, 0.0)
    assert torch.allclose(work0(x), net_a(x), atol=1e-4)


def test_repair_folds_into_batchnorm_and_keeps_the_model_class():
    net, a = _trained_bn_state(0)
    _, b = _trained_bn_state(1)
    x = torch.randn(64, 1, 6, 6)
    rep = Repair(net, a, b, [x])
    assert rep.modules == ["0", "1"]
    work = copy.deepcopy(net)
    work.load_state_dict(interpolate_states(a, b, 0.5))
    rep(work, 0.5)
    assert type(work[1]) is nn.BatchNorm2d
    with torch.no_grad():
        h = work[:2].eval()(x)
    goal_mean, goal_std = rep.goal(0.5)["1"]
    assert torch.allclose(h.mean((0, 2, 3)).double(), goal_mean, atol=1e-4)
    assert torch.allclose(h.std((0, 2, 3), unbiased=False).double(), goal_std, atol=1e-4)


# -- layer-wise ---------------------------------------------------------------------------

def test_layerwise_only_the_moving_layer_changes_the_curve():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    a = _clone(net.state_dict())
    b = _clone(a)
    b["2.weight"] = b["2.weight"] + torch.randn_like(b["2.weight"])
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    groups = layer_groups(a)
    assert list(groups) == ["0", "2", "4"] and groups["2"] == ["2.weight", "2.bias"]
    curves = layerwise_curves(net, a, b, evaluator((x, y)), lambdas=[0, 0.25, 0.5, 0.75, 1])
    flat = layerwise_barriers(curves)
    assert flat["0"] == 0.0 and flat["4"] == 0.0
    assert np.ptp(curves["2"].loss) > 0
    assert list(layer_groups(_bn_net().state_dict(), depth=1)) == ["0", "1", "5"]


@pytest.mark.parametrize("kind", ["layernorm_tokens", "groupnorm"])
def test_repair_channel_axis_of_layernorm_and_groupnorm(kind):
    torch.manual_seed(0)
    if kind == "layernorm_tokens":  # (batch, tokens, channels): channels last
        net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
        x, dims = torch.randn(16, 5, 4), (0, 1)
    else:  # (batch, channels, h, w): channels at dim 1
        net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.GroupNorm(1, 8), nn.ReLU(), nn.Conv2d(8, 3, 1))
        x, dims = torch.randn(16, 2, 6, 6), (0, 2, 3)
    autoperm.randomize_(net, 0)
    a = _clone(net.state_dict())
    b = _clone(autoperm.randomize_(copy.deepcopy(net), 1, scale=1.0).state_dict())
    rep = Repair(net, a, b, [x])
    assert rep.modules == ["0", "1"]
    work = copy.deepcopy(net)
    work.load_state_dict(interpolate_states(a, b, 0.3))
    rep(work, 0.3)
    with torch.no_grad():
        h = work[:2](x)
    goal_mean, goal_std = rep.goal(0.3)["1"]
    assert torch.allclose(h.mean(dims).double(), goal_mean, atol=1e-4)
    assert torch.allclose(h.std(dims, unbiased=False).double(), goal_std, atol=1e-4)
