"""Nothing lost: functions without a trailing underscore never modify the user's model or state dict.

Each test snapshots everything a call could touch (values, tensor identities, dtypes, devices,
requires_grad, grads, train/eval flags of every submodule, BatchNorm statistics and counters,
the spec and the permutation passed in) and compares after the call.
"""
import copy

import pytest
import torch
from torch import nn

import autoperm
from autoperm.testing import random_architecture


def _model_snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v.detach().clone(), v.data_ptr(), v.dtype, v.device) for k, v in model.state_dict().items()},
        "params": {k: (p.requires_grad, None if p.grad is None else p.grad.clone()) for k, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
    }


def _assert_model_unchanged(model: nn.Module, snap: dict):
    now = _model_snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, (v, ptr, dtype, dev) in snap["state"].items():
        w, ptr2, dtype2, dev2 = now["state"][k]
        assert torch.equal(v, w), f"{k} changed"
        assert (ptr, dtype, dev) == (ptr2, dtype2, dev2), f"{k} replaced"
    assert now["params"].keys() == snap["params"].keys()
    for k, (rg, g) in snap["params"].items():
        rg2, g2 = now["params"][k]
        assert rg == rg2 and (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), f"{k} grad changed"
    assert now["modes"] == snap["modes"]
    assert now["ids"] == snap["ids"]


def _state_snapshot(sd) -> dict:
    return {k: (v.clone(), v.data_ptr()) for k, v in sd.items()}


def _assert_state_unchanged(sd, snap):
    assert list(sd.keys()) == list(snap.keys())
    for k, (v, ptr) in snap.items():
        assert torch.equal(sd[k], v) and sd[k].data_ptr() == ptr, f"{k} changed"


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                         nn.GroupNorm(2, 8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _models():
    out = [("bn-train", _bn_net().train(), torch.randn(4, 3, 6, 6)),
           ("bn-eval", _bn_net().eval(), torch.randn(4, 3, 6, 6))]
    for seed in (3, 5, 11, 40):
        a = random_architecture(seed)
        out.append((f"fuzz-{seed}", a.model.train(seed % 2 == 0), a.inputs))
    return out


MODELS = _models()


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
def test_infer_spec_and_axis_graph_leave_the_model_alone(name, model, x):
    model = copy.deepcopy(model)
    snap = _model_snapshot(model)
    autoperm.infer_spec(model, x)
    autoperm.axis_graph(model, x)
    _assert_model_unchanged(model, snap)


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
def test_check_invariance_leaves_model_spec_and_inputs_alone(name, model, x):
    model = copy.deepcopy(model)
    spec = autoperm.infer_spec(model, x)
    snap, spec_json = _model_snapshot(model), spec.to_json()
    xs = [t.clone() for t in (x if isinstance(x, tuple) else (x,))]
    autoperm.check_invariance(model, spec, x)  # in train mode BatchNorm statistics move: on copies only
    _assert_model_unchanged(model, snap)
    assert spec.to_json() == spec_json
    assert all(torch.equal(a, b) for a, b in zip(xs, x if isinstance(x, tuple) else (x,)))


@pytest.mark.parametrize("name,model,x", MODELS, ids=[m[0] for m in MODELS])
def test_apply_permutation_returns_new_tensors(name, model, x):
    model = copy.deepcopy(model)
    spec = autoperm.infer_spec(model, x)
    perm = autoperm.random_permutation(spec, 1)
    perm_snap = {g: p.clone() for g, p in perm.items()}
    sd = model.state_dict()
    snap, msnap = _state_snapshot(sd), _model_snapshot(model)
    out = autoperm.apply_permutation(spec, perm, sd)
    _assert_state_unchanged(sd, snap)
    _assert_model_unchanged(model, msnap)
    assert all(torch.equal(perm[g], perm_snap[g]) for g in perm)
    for k, exprs in spec.axes.items():
        if any(exprs):
            assert out[k].data_ptr() != sd[k].data_ptr(), f"{k} shares memory with the input"


def test_permutation_helpers_leave_their_arguments_alone():
    p = {"a": torch.tensor([2, 0, 1]), "b": torch.tensor([1, 0])}
    q = {"a": torch.tensor([1, 2, 0]), "b": torch.tensor([0, 1])}
    ps, qs = {k: v.clone() for k, v in p.items()}, {k: v.clone() for k, v in q.items()}
    autoperm.inverse_permutation(p)
    autoperm.compose_permutations(p, q)
    assert all(torch.equal(p[k], ps[k]) and torch.equal(q[k], qs[k]) for k in p)


def _matching_inputs():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    autoperm.randomize_(m, 0)
    x = torch.randn(8, 4)
    spec = autoperm.infer_spec(m.eval(), x)
    a = copy.deepcopy(m)
    b = copy.deepcopy(m)
    b.load_state_dict(autoperm.apply_permutation(spec, autoperm.random_permutation(spec, 2), m.state_dict()))
    return spec, a, b, x


def test_weight_matching_leaves_states_and_init_alone():
    spec, a, b, _ = _matching_inputs()
    sa, sb = a.state_dict(), b.state_dict()
    snap_a, snap_b = _state_snapshot(sa), _state_snapshot(sb)
    init = autoperm.random_permutation(spec, 5)
    init_snap = {g: p.clone() for g, p in init.items()}
    autoperm.weight_matching(spec, sa, sb, progress=False)
    autoperm.weight_matching(spec, sa, sb, init=init, restarts=2, progress=False)
    _assert_state_unchanged(sa, snap_a)
    _assert_state_unchanged(sb, snap_b)
    assert all(torch.equal(init[g], init_snap[g]) for g in init)


@pytest.mark.parametrize("which", [
    "activation_matching",
    pytest.param("ste_matching", marks=pytest.mark.xfail(strict=True, reason=(
        "ste_matching runs model_a's BatchNorm in train mode on a state whose integer buffers are model_a's own "
        "tensors (fixed_mid keeps state_a[k] for num_batches_tracked): the counter is incremented in place. "
        "Fix in autoperm/matching/ste.py: clone non-floating tensors in fixed_mid."))),
])
def test_data_matchers_leave_models_alone(which):
    fn = getattr(autoperm, which, None)
    if fn is None:
        pytest.skip(f"autoperm.{which} does not exist yet")
    spec, a, b, x = _matching_inputs()
    a.train()
    b.eval()
    snap_a, snap_b = _model_snapshot(a), _model_snapshot(b)
    batches = [x, x + 1]
    if which == "activation_matching":
        fn(spec, a, b, batches, progress=False)
    else:
        y = torch.randint(0, 3, (8,))
        fn(spec, a, b, [(x, y), (x + 1, y)], nn.functional.cross_entropy, steps=2, lr=0.01, progress=False)
    _assert_model_unchanged(a, snap_a)
    _assert_model_unchanged(b, snap_b)


def test_state_interpolation_and_merging_leave_states_alone():
    spec, a, b, _ = _matching_inputs()
    sa, sb = a.state_dict(), b.state_dict()
    snap_a, snap_b = _state_snapshot(sa), _state_snapshot(sb)
    autoperm.interpolate_states(sa, sb, 0.3)
    autoperm.average_states([sa, sb])
    autoperm.merge_models(spec, [sa, sb])
    _assert_state_unchanged(sa, snap_a)
    _assert_state_unchanged(sb, snap_b)
