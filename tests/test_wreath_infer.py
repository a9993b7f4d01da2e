"""Inference of inner groups that permute independently per block (heads, conv groups), and where it must not."""
import pytest
import torch
import torch.nn.functional as F

import autoperm
from rule_helpers import GroupNet

C, H = 12, 3


class Attn(torch.nn.Module):
    """Fused-qkv attention; ``twist`` adds an op that may or may not allow per-head dims."""

    def __init__(self, twist=None, sdpa=False):
        super().__init__()
        self.qkv, self.proj, self.twist, self.sdpa = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C), twist, sdpa
        self.dim_scale = torch.nn.Parameter(torch.randn(C // H))  # one scale per head dim, shared by the heads
        self.head_scale = torch.nn.Parameter(torch.randn(H, 1, 1))
        self.mix = torch.nn.Parameter(torch.randn(H, H))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        if self.twist == "shared_dim_scale":
            q = q * self.dim_scale
        if self.twist == "head_scale":
            v = v * self.head_scale
        if self.twist == "mix_heads":
            v = torch.einsum("hg,bgtd->bhtd", self.mix, v)
        if self.twist == "softmax_over_heads":
            v = v.softmax(1)
        if self.twist == "add_head_mean":
            v = v + v.mean(1, keepdim=True)
        o = F.scaled_dot_product_attention(q, k, v) if self.sdpa else (q @ k.transpose(-2, -1)).softmax(-1) @ v
        if self.twist == "sum_over_heads":  # heads summed before the head dim is contracted
            return self.proj(o.sum(1).repeat(1, 1, H))
        return self.proj(o.transpose(1, 2).reshape(B, T, C))


def _per(spec):
    return {g.name: g.per for g in spec.groups if g.per}


def _invariant(model, spec, x):
    for seed in range(3):
        assert autoperm.check_invariance(model, spec, x, seed=seed) < 1e-5


@pytest.mark.parametrize("twist,n_per", [(None, 2), ("head_scale", 2), ("shared_dim_scale", 1), ("mix_heads", 1),
                                          ("softmax_over_heads", 1), ("add_head_mean", 1),
                                          ("sum_over_heads", 1)])
@pytest.mark.parametrize("sdpa", [False, True])
def test_attention_head_dims_are_per_head_unless_an_op_couples_heads(twist, n_per, sdpa):
    torch.manual_seed(0)
    m, x = Attn(twist, sdpa).eval(), torch.randn(2, 5, C)
    autoperm.randomize_(m)
    spec = autoperm.infer_spec(m, x)
    per = _per(spec)
    assert len(per) == n_per, per
    assert len(set(per.values())) <= 1  # the block is the head group
    _invariant(m, spec, x)
    if twist in ("shared_dim_scale",):  # q/k dims shared by every head (the scale is), v/o dims still per head
        assert spec.axes["dim_scale"][0]["g"] not in per


def test_gqa_llama_per_kv_group():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, use_cache=False)
    torch.manual_seed(0)
    m, x = transformers.LlamaModel(cfg).eval(), torch.randint(0, 50, (2, 6))
    autoperm.randomize_(m)
    spec = autoperm.infer_spec(m, x)
    per = _per(spec)
    v_dims = spec.axes["layers.0.self_attn.v_proj.weight"][0]["prod"][1]["g"]
    kv_heads = spec.axes["layers.0.self_attn.v_proj.weight"][0]["prod"][0]["g"]
    assert per[v_dims] == kv_heads  # v/o dims per key/value head; q/k dims stay pinned (rotary pairs)
    assert len(per) == 2 and set(per.values()) == {kv_heads}  # and the q heads of a group permute per group
    _invariant(m, spec, x)


def test_grouped_conv_and_group_norm_channels_per_group():
    torch.manual_seed(0)
    m, x = GroupNet().eval(), torch.randn(2, 3, 8, 8)
    autoperm.randomize_(m)
    spec = autoperm.infer_spec(m, x)
    per = _per(spec)
    assert len(per) == 3 and len(set(per.values())) == 1, per
    _invariant(m, spec, x)
    m2 = GroupNet(shared_scale=True).eval()
    autoperm.randomize_(m2)
    spec2 = autoperm.infer_spec(m2, x)
    assert len(_per(spec2)) == 2  # GroupNorm's within-group channels are shared now; c2's and dw's outputs still per group
    _invariant(m2, spec2, x)


def test_multihead_attention_module():
    torch.manual_seed(0)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.i, self.a, self.o = torch.nn.Linear(5, C), torch.nn.MultiheadAttention(C, H, batch_first=True), torch.nn.Linear(C, 5)

        def forward(self, x):
            h = self.i(x)
            return self.o(self.a(h, h, h, need_weights=False)[0])

    m, x = M().eval(), torch.randn(2, 4, 5)
    autoperm.randomize_(m)
    spec = autoperm.infer_spec(m, x)
    assert len(_per(spec)) == 2  # the packed in-projection: q/k dims and v dims, each per head
    assert "cat" in spec.axes["a.in_proj_weight"][0]
    _invariant(m, spec, x)


@pytest.mark.parametrize("twist", ["softmax_over_heads", "add_head_mean"])
def test_forcing_per_head_value_dims_where_heads_meet_breaks_the_model(twist):
    """The adversarial toys are real: declaring the value dims per head there changes the outputs."""
    torch.manual_seed(0)
    m, x = Attn(twist).eval(), torch.randn(2, 5, C)
    autoperm.randomize_(m)
    with pytest.warns(UserWarning, match="not used"):
        spec = autoperm.infer_spec(m, x)
    heads, v_dims = (p["g"] for p in spec.axes["qkv.weight"][0]["cat"][2]["prod"])
    assert v_dims not in spec.per
    forced = autoperm.PermutationSpec.from_axes(spec.axes, spec.group_sizes, spec.pinned, spec.shapes,
                                                per={**spec.per, v_dims: heads})
    assert max(autoperm.check_invariance(m, forced, x, seed=s) for s in range(3)) > 1e-3


def test_inspect_shows_the_block_structure():
    from autoperm.cli import format_spec
    torch.manual_seed(0)
    m, x = Attn().eval(), torch.randn(2, 5, C)
    with pytest.warns(UserWarning, match="not used"):
        spec = autoperm.infer_spec(m, x)
    text = format_spec(spec)
    assert "(2 of them per block of another group, 1 block group)" in text and "per block of" in text
    heads = next(iter(spec.per.values()))
    row = next(line.split(None, 2) for line in text.split("block structure:")[1].splitlines()[3:] if line.strip())
    assert row[:2] == [heads, str(H)] and all(d in row[2] for d in spec.per)  # H blocks, each with its own dims
    assert f"{H}x[{C // H}]*" in text  # heads x dims, the dims independent per head
