"""How the zoo decides that a spec is sound when float32 round-off alone exceeds the tolerance."""
import torch
from torch import nn

import autoperm
from autoperm.zoo import invariance_errors, invariance_holds
from autoperm.zoo._check import noise_floor


def _bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                        nn.LazyLinear(2))
    x = torch.randn(2, 3, 6, 6)
    net(x)
    return autoperm.randomize_(net).eval(), x


def test_noise_floor_is_round_off_sized():
    net, x = _bn_net()
    assert 0 < noise_floor(net, x) < 1e-4
    assert not net.training


def test_sound_spec_holds_on_float32():
    net, x = _bn_net()
    spec = autoperm.infer_spec(net, x)
    assert invariance_holds(net, spec, x, invariance_errors(net, spec, x)) == (True, None, "float32")


def test_wrong_spec_fails_every_fallback():
    """A spec that forgets the BatchNorm's running statistics: wrong in eval and in train mode."""
    net, x = _bn_net()
    spec = autoperm.infer_spec(net, x)
    g = spec.axes["0.weight"][0]["g"]
    wrong = autoperm.PermutationSpec.from_axes(
        {k: ([None] * len(ex) if k.endswith(("running_mean", "running_var")) else ex) for k, ex in spec.axes.items()},
        spec.group_sizes, spec.pinned, spec.shapes)
    assert wrong.group_sizes[g] == 8
    errors = invariance_errors(net, wrong, x)
    ok, e64, basis = invariance_holds(net, wrong, x, errors)
    assert not ok and basis == "failed" and e64 > 1e-3
