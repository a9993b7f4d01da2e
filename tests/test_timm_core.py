"""The core's acceptance set: twenty timm architectures get a sound and complete spec."""
import pytest
import timm
import torch

import autoperm

MODELS = """resnet50 resnet50_gn resnext26ts densenet121 dla34 efficientnet_b0 mobilenetv2_100 mobilenetv3_small_100
ghostnet_100 regnety_002 convnext_atto vit_small_patch16_224 deit_tiny_patch16_224 swin_tiny_patch4_window7_224
levit_128s mixer_s16_224 crossvit_tiny_240 mobilevit_xxs maxvit_tiny_tf_224 efficientformer_l1""".split()


def build(name):
    torch.manual_seed(0)
    for kwargs in ({"drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0}, {}):
        try:  # functional dropout in train mode draws masks per position: not permutation-equivariant
            m = timm.create_model(name, pretrained=False, **kwargs)
            break
        except TypeError:
            continue
    autoperm.randomize_(m.eval(), seed=0)
    x = torch.randn(2, *m.pretrained_cfg["input_size"])
    return m, x


@pytest.mark.parametrize("name", MODELS)
def test_random_permutation_leaves_outputs_unchanged(name):
    m, x = build(name)
    spec = autoperm.infer_spec(m, x)
    assert spec.groups, "no permutation group found"
    assert not spec.unsupported, spec.unsupported
    assert autoperm.check_invariance(m, spec, x) <= 1e-4
    if any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
        assert autoperm.check_invariance(m.train(), spec, x) <= 1e-4


def test_resnet50_has_37_groups():
    m, x = build("resnet50")
    spec = autoperm.infer_spec(m, x)
    sizes = sorted(spec.group_sizes.values())
    # stem 64, four residual streams (256, 512, 1024, 2048), two per bottleneck (16 blocks)
    assert len(sizes) == 37
    assert sorted(g.size for g in spec.groups if len(g.keys) > 20) == [256, 512, 1024, 2048]
    assert spec.group_sizes[spec.axes["conv1.weight"][0]["g"]] == 64


def test_vit_small_stream_mlp_and_heads():
    m, x = build("vit_small_patch16_224")
    spec = autoperm.infer_spec(m, x)
    stream = spec.axes["blocks.0.norm1.weight"][0]["g"]
    assert spec.group_sizes[stream] == 384
    assert all(spec.axes[f"blocks.{i}.mlp.fc2.weight"][0] == {"g": stream} for i in range(12))
    hidden = {spec.axes[f"blocks.{i}.mlp.fc1.weight"][0]["g"] for i in range(12)}
    assert len(hidden) == 12 and {spec.group_sizes[h] for h in hidden} == {1536}
    proj_in = spec.axes["blocks.0.attn.proj.weight"][1]["prod"]
    assert [spec.group_sizes[p["g"]] for p in proj_in] == [6, 64]  # heads x within-head dims
    q, k, v = spec.axes["blocks.0.attn.qkv.weight"][0]["cat"]
    assert q == k and v == {"prod": proj_in} and q["prod"][1] != v["prod"][1]
    assert len(spec.groups) == 1 + 12 * 4  # stream; per block: MLP hidden, heads, q·k dims, v dims
