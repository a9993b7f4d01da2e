"""Loading a new state dict drops caches computed from the old weights (timm's LeViT attention biases)."""
import torch
from torch import nn

import autoperm


class _CachedScale(nn.Module):
    """Like LeViT's attention: an eval-mode forward caches a value derived from a parameter; train() clears it."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(n) + 0.5)
        self.cache = {}

    def train(self, mode=True):
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x):
        if self.training:
            return x * self.scale
        if "s" not in self.cache:
            self.cache["s"] = self.scale * 1.0
        return x * self.cache["s"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), _CachedScale(6), nn.ReLU(), nn.Linear(6, 2)).eval()


def test_invariance_check_is_not_fooled_by_a_stale_cache():
    net, x = _net(), torch.randn(4, 3)
    spec = autoperm.infer_spec(net, x)
    with torch.no_grad():
        net(x)  # fills the cache, as a first evaluation does
    assert spec.axes["1.scale"][0] is not None
    assert autoperm.check_invariance(net, spec, x) < 1e-6


def test_interpolation_curve_uses_each_interpolated_state():
    net, x = _net(), torch.randn(4, 3)
    with torch.no_grad():
        net(x)
    a = {k: v.clone() for k, v in net.state_dict().items()}
    b = {k: v * 2 for k, v in a.items()}
    curve = autoperm.interpolation_curve(net, a, b, lambda m: float(m(x).abs().sum()), lambdas=[0, 1])
    ref = _net()
    ref.load_state_dict(b)
    assert abs(curve.loss[-1] - float(ref(x).abs().sum())) < 1e-5


def test_permute_model_in_place_drops_the_cache():
    net, x = _net(), torch.randn(4, 3)
    spec = autoperm.infer_spec(net, x)
    with torch.no_grad():
        y = net(x)
        autoperm.permute_model_(net, spec, autoperm.random_permutation(spec, seed=1))
        assert torch.allclose(net(x), y, atol=1e-6)


class _Versioned(nn.Linear):
    """Like torchvision's MNASNet: loading needs the module version that state_dict() records."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        assert local_metadata.get("version") == 2, "version should be set to 2"
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


def test_new_state_dicts_keep_the_module_versions():
    net = nn.Sequential(_Versioned(3, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = autoperm.infer_spec(net, torch.randn(2, 3))
    sd = net.state_dict()
    for new in (autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=0), sd),
                autoperm.interpolate_states(sd, sd, 0.5), autoperm.average_states([sd, sd])):
        nn.Sequential(_Versioned(3, 4), nn.ReLU(), nn.Linear(4, 2)).load_state_dict(new)


class _FunctionalDropout(nn.Module):
    """GoogLeNet's auxiliary heads: F.dropout called in train mode, outside any nn.Dropout."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.relu(self.a(x)), 0.5, training=self.training))


def test_train_mode_check_ignores_functional_dropout():
    net, x = _FunctionalDropout(), torch.randn(4, 3)
    spec = autoperm.infer_spec(net.eval(), x)
    assert autoperm.check_invariance(net.train(), spec, x) < 1e-6
    assert torch.nn.functional.dropout(torch.ones(1000), 0.5).eq(0).any()  # restored afterwards


class _Aux(nn.Module):
    """An auxiliary head that runs only in train mode (GoogLeNet, Inception-v3)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(3, 6), nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return (self.b(h), self.aux(h)) if self.training else self.b(h)


def test_train_only_modules_are_traced_in_train_mode_too():
    """Eval mode leaves the head unused, so infer_spec traces train mode as well: one spec, exact in both."""
    import warnings

    net, x = _Aux().eval(), torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = autoperm.infer_spec(net, x)
    assert not net.training
    assert {(m.key, m.axis) for m in spec.groups[0].members} >= {("a.weight", 0), ("b.weight", 1), ("aux.weight", 1)}
    for mode in (False, True):
        assert autoperm.check_invariance(net.train(mode), spec, x) < 1e-6


def test_eval_only_spec_warns_about_train_only_modules():
    import pytest

    torch.manual_seed(0)
    net, x = _Aux().eval(), torch.randn(4, 3)
    with pytest.warns(UserWarning, match="not used by the graph traced in eval mode .*aux.bias.*exact for eval mode"):
        spec = autoperm.infer_spec(net, x, modes=("eval",))
    assert autoperm.check_invariance(net, spec, x) < 1e-6
    assert autoperm.check_invariance(net.train(), spec, x) > 1e-2  # the head reads permuted units


def test_modes_are_checked_and_submodule_modes_restored():
    import pytest

    net = _Aux().train()
    net.a.eval()
    with pytest.raises(ValueError, match="modes must name"):
        autoperm.infer_spec(net, torch.randn(2, 3), modes=("test",))
    autoperm.infer_spec(net, torch.randn(2, 3), modes=("eval", "train"))
    assert net.training and not net.a.training and net.b.training


class _Ema(nn.Module):
    """A buffer overwritten in forward: a running mean kept by hand."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)
        self.register_buffer("ema", torch.zeros(5))

    def forward(self, x):
        h = torch.relu(self.a(x))
        self.ema = 0.9 * self.ema + 0.1 * h.mean(0)
        return self.b(h)


def test_buffer_assigned_in_forward_permutes_with_its_source():
    """A buffer overwritten in forward (a running mean kept by hand) follows the units it averages."""

    net, x = _Ema(), torch.randn(4, 3)
    spec = autoperm.infer_spec(net, x)
    assert len(spec.groups) == 1 and {m.key for m in spec.groups[0].members} >= {"ema", "a.weight", "b.weight"}
    assert autoperm.check_invariance(net, spec, x) < 1e-6


def test_buffer_mutation_outputs_of_a_functional_graph_follow_their_buffer(monkeypatch):
    """Functional graphs (``run_decompositions``; older torch.export) return a buffer's new value as an
    output: it is permuted as the buffer, not pinned as a model output."""

    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: export(*a, **k).run_decompositions({}))
    from autoperm._trace import trace

    assert trace(_Ema(), torch.randn(4, 3)).mutations == {"add": "ema"}
    spec = autoperm.infer_spec(_Ema(), torch.randn(4, 3))
    assert len(spec.groups) == 1 and {m.key for m in spec.groups[0].members} >= {"ema", "a.weight", "b.weight"}
