"""Mixture of experts: routing rules on toy layers, then tiny random configs of transformers' MoE families.

The expert axis is free when the router's expert ids (``topk`` indices) are only read as ids: to
index per-expert weights, one-hot masks, histograms of a routing sort whose rows reach a grouped
matmul. Router rows, per-expert weights and biases then permute together. Anything else reading
the ids pins the expert axis. The transformers tests are skipped when transformers is missing.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoperm
from autoperm.testing._moe import FusedMoE, ModuleListMoE, MoEModel
from rule_helpers import spec_and_error

TOL = 1e-5


def _group(spec, key, axis):
    return spec.axes[key][axis]


def _pin_reasons(spec, key, axis):
    return {p.reason.split(" at ")[0] for p in spec.pinned if p.key == key and p.axis == axis}


# -- toy layers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["grouped", "gather", "scatter"])
def test_fused_experts_permute_with_router_rows(how):
    spec, err = spec_and_error(FusedMoE(8, 4, experts=4, k=2, how=how, router_bias=True), torch.randn(2, 5, 8))
    assert spec.unsupported == []
    assert err < TOL
    expert = _group(spec, "router.weight", 0)
    assert expert is not None and "g" in expert
    assert _group(spec, "gate_up_proj", 0) == _group(spec, "down_proj", 0) == _group(spec, "score_bias", 0) == expert
    assert _group(spec, "down_proj", 2) is not None  # the experts' hidden units (one permutation for all)
    assert _group(spec, "gate_up_proj", 2) is None  # the input: pinned here, free inside a model
    assert spec.permuted_fraction() == 1.0


@pytest.mark.parametrize("style", ["grouped", "gather", "scatter", "modulelist"])
def test_moe_model_keeps_residual_and_hidden_units_free(style):
    spec, err = spec_and_error(MoEModel(style=style), torch.randint(0, 32, (2, 6)))
    assert spec.unsupported == [] and err < TOL
    assert spec.permuted_fraction() > 0.95  # all but the head's bias (the output)
    residual = _group(spec, "embed.weight", 1)
    if style == "modulelist":  # whole experts move with their router rows, each with its own hidden units
        expert = _group(spec, "moes.0.router.weight", 0)
        assert expert is not None and "g" in expert
        (m,) = [m for m in spec.modules if m.axis == expert["g"]]
        assert m.prefixes == tuple(f"moes.0.experts.{e}." for e in range(4))
        hidden = tuple(_group(spec, f"moes.0.experts.{e}.gate.weight", 0)["g"] for e in range(4))
        assert m.local == (hidden,) and len(set(hidden)) == 4
        assert _group(spec, "moes.0.experts.0.down.weight", 0) == residual
    else:
        assert _group(spec, "moes.1.gate_up_proj", 0) == _group(spec, "moes.1.router.weight", 0) is not None
        assert _group(spec, "moes.1.down_proj", 1) == residual


class _IdsAsNumbers(nn.Module):
    """Expert ids added to the output as numbers: permuting experts would change them."""

    def __init__(self):
        super().__init__()
        self.router, self.out = nn.Linear(6, 4), nn.Linear(6, 6)

    def forward(self, x):
        _, ids = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        return self.out(x) + ids.float().sum(-1, keepdim=True)


def test_topk_indices_read_as_numbers_pin_the_expert_axis():
    spec, err = spec_and_error(_IdsAsNumbers(), torch.randn(5, 6))
    assert _group(spec, "router.weight", 0) is None
    assert "top-k indices read as numbers" in _pin_reasons(spec, "router.weight", 0)
    assert err < TOL


class _OneHotBias(nn.Module):
    """A per-expert bias picked by a one-hot mask of the top-k ids, and scattered routing weights."""

    def __init__(self, scatter: bool):
        super().__init__()
        self.scatter = scatter
        self.router = nn.Linear(6, 4)
        self.expert_bias = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        w, ids = torch.topk(probs, 2, dim=-1)
        if self.scatter:
            mask = torch.zeros_like(probs).scatter(1, ids, w)
        else:
            mask = (F.one_hot(ids, 4) * w.unsqueeze(-1)).sum(1)
        return x + mask @ self.expert_bias


@pytest.mark.parametrize("scatter", [False, True], ids=["one_hot", "scatter"])
def test_routing_masks_tie_expert_rows(scatter):
    spec, err = spec_and_error(_OneHotBias(scatter), torch.randn(5, 6))
    assert _group(spec, "router.weight", 0) is not None
    assert _group(spec, "expert_bias", 0) == _group(spec, "router.weight", 0) == _group(spec, "router.bias", 0)
    assert err < TOL


class _SortedRowsByPosition(FusedMoE):
    """The grouped path, but the first sorted row is also read by position: the sort order matters."""

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        _, ids = torch.topk(self.router(h).softmax(-1), self.k, dim=-1)
        ids_g, perm = torch.sort(ids.reshape(-1))
        rows = h[perm // self.k]
        offs = torch.cumsum(torch.histc(ids_g.float(), bins=self.experts, min=0, max=self.experts - 1), 0,
                            dtype=torch.int32)
        out = torch.ops.autoperm.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs)
        return x + out[:1, :x.shape[-1]].sum()


@pytest.mark.filterwarnings("ignore:1 parameters are not used")
def test_routing_sort_read_by_position_pins_the_experts():
    spec, err = spec_and_error(_SortedRowsByPosition(8, 4, experts=4, k=2), torch.randn(6, 8))
    assert _group(spec, "router.weight", 0) is None and _group(spec, "gate_up_proj", 0) is None
    assert err < TOL


class _HistogramOtherBins(nn.Module):
    def __init__(self):
        super().__init__()
        self.router, self.scale = nn.Linear(6, 4), nn.Parameter(torch.randn(5))

    def forward(self, x):
        _, ids = torch.topk(self.router(x), 1, dim=-1)
        counts = torch.histc(ids.float(), bins=5, min=0, max=4)
        return x * (counts * self.scale).sum()


def test_histogram_with_other_bins_pins_the_ids():
    spec, err = spec_and_error(_HistogramOtherBins(), torch.randn(5, 6))
    assert _group(spec, "router.weight", 0) is None and _group(spec, "scale", 0) is None
    assert err < TOL


class _Interleaved(nn.Module):
    """gate/up interleaved on one axis (x[..., ::2], x[..., 1::2]), as GPT-OSS stores them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(8, 6)

    def forward(self, x):
        h = self.a(x)
        return self.b(F.silu(h[..., ::2]) * h[..., 1::2])


def test_strided_slices_over_a_whole_axis_keep_the_groups():
    spec, err = spec_and_error(_Interleaved(), torch.randn(3, 6))
    assert spec.group_sizes and list(spec.group_sizes.values()) == [8]
    assert _group(spec, "a.weight", 0) == {"prod": [_group(spec, "b.weight", 1), {"fixed": 2}]}
    assert err < TOL


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch")
def test_aten_grouped_mm_ties_hidden_axes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 16, 32, dtype=torch.bfloat16))
            self.v = nn.Parameter(torch.randn(2, 32, 16, dtype=torch.bfloat16))

        def forward(self, x):
            offs = torch.tensor([4, 8], dtype=torch.int32)
            return torch._grouped_mm(torch._grouped_mm(x, self.w, offs=offs).relu(), self.v, offs=offs)

    try:
        spec = autoperm.infer_spec(M(), torch.randn(8, 16, dtype=torch.bfloat16))
    except autoperm.TraceError as e:  # pragma: no cover - a torch without a CPU meta kernel for it
        pytest.skip(f"torch._grouped_mm does not trace here: {e}")
    assert spec.unsupported == []
    assert _group(spec, "w", 2) == _group(spec, "v", 1) is not None
    assert _group(spec, "w", 0) is None  # offsets from a constant: the experts are addressed by position
    assert "expert axis addressed by group offsets" in _pin_reasons(spec, "w", 0)


# -- planted recovery on a toy MoE model ----------------------------------------------------------
def _planted(model, x, batches):
    autoperm.randomize_(model, 0)
    model.eval()
    spec = autoperm.infer_spec(model, x)
    a = model.state_dict()
    p = autoperm.random_permutation(spec, seed=3)
    b = autoperm.apply_permutation(spec, p, a)
    inv = autoperm.inverse_permutation(p)
    wm = autoperm.weight_matching(spec, a, b, progress=False)
    model_b = copy.deepcopy(model)
    model_b.load_state_dict(b)
    am = autoperm.activation_matching(spec, model, model_b, batches, progress=False)
    return spec, inv, wm, am


@pytest.mark.parametrize("style", ["grouped", "modulelist"])
def test_planted_permutation_of_a_moe_is_recovered(style):
    torch.manual_seed(0)
    spec, inv, wm, am = _planted(MoEModel(style=style), (torch.randint(0, 32, (2, 6)),),
                                 [torch.randint(0, 32, (8, 6)) for _ in range(2)])
    assert all(torch.equal(wm[g], inv[g]) for g in spec.group_sizes)
    assert all(torch.equal(am[g], inv[g]) for g in spec.group_sizes)


# -- transformers MoE families --------------------------------------------------------------------
try:
    import transformers
except ImportError:
    transformers = None

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=32, use_cache=False)
FAMILIES = {  # class name, config name, config arguments, (router key, experts key) of layer 1
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2),
                ("mlp.gate.weight", "mlp.experts")),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, decoder_sparse_step=1),
                  ("mlp.gate.weight", "mlp.experts")),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1,
                       head_dim=8), ("mlp.gate.weight", "mlp.experts")),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2),
              ("mlp.gate.weight", "mlp.experts")),
    "gpt_oss": ("GptOssForCausalLM", "GptOssConfig",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                     layer_types=["sliding_attention", "full_attention"]), ("mlp.router.weight", "mlp.experts")),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "DeepseekV3Config",
                    dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16,
                         q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8),
                    ("mlp.gate.weight", "mlp.experts")),
}


PER_EXPERT = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}


class Logits(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


def hf_moe(name):
    cls, cfg_cls, kwargs, _ = FAMILIES[name]
    if transformers is None or not hasattr(transformers, cls):
        pytest.skip(f"transformers lacks {cls}" if transformers else "transformers is not installed")
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **kwargs})
    return Logits(getattr(transformers, cls)(cfg)), (torch.randint(0, 64, (2, 8)),)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def moe_family(request):
    model, x = hf_moe(request.param)
    spec, err = spec_and_error(model.eval(), x)
    return request.param, model, x, spec, err


def test_moe_family_is_invariant_with_free_experts(moe_family):
    name, model, x, spec, err = moe_family
    assert err < 1e-4, name
    assert spec.unsupported == [], spec.unsupported
    assert spec.permuted_fraction() >= 0.95
    router, experts = (f"model.model.layers.1.{k}" for k in FAMILIES[name][3])
    expert = _group(spec, router, 0)
    assert expert is not None and "cat" not in str(expert) and "fixed" not in str(expert)  # every expert moves
    assert _group(spec, f"{experts}.gate_up_proj", 0) == _group(spec, f"{experts}.down_proj", 0) == expert
    residual = _group(spec, "model.model.embed_tokens.weight", 1)
    assert residual in spec.axes[f"{experts}.down_proj"]
    hidden = [e for e in spec.axes[f"{experts}.down_proj"][1:] if e != residual]
    assert hidden and hidden[0] is not None
    if name in PER_EXPERT:  # each expert's hidden units permute on their own
        assert spec.per[hidden[0]["g"]] == expert["g"]
    else:  # DeepSeek-V3: experts as a product (group-limited routing), hidden units per block of one factor
        factors = [e["g"] for e in expert["prod"]]
        assert len(factors) == 2 and spec.per[hidden[0]["g"]] in factors


def test_moe_family_planted_weight_matching(moe_family):
    name, model, x, spec, err = moe_family
    a = model.state_dict()
    p = autoperm.random_permutation(spec, seed=5)
    b = autoperm.apply_permutation(spec, p, a)
    aligned = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, a, b, progress=False), b)
    for k in spec.axes:
        assert torch.equal(aligned[k], a[k]), k


def test_mixtral_planted_activation_matching():
    model, x = hf_moe("mixtral")
    spec, inv, wm, am = _planted(model, x, [torch.randint(0, 64, (8, 8)) for _ in range(2)])
    assert spec.per  # the experts' hidden units, one permutation per expert
    assert all(torch.equal(am[g], inv[g]) for g in spec.group_sizes)


def test_batched_mm_experts_implementation_frees_the_experts_too():
    """transformers' "batched_mm" experts index the fused weights by expert id and run bmm."""
    model, x = hf_moe("mixtral")
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._experts_implementation = "batched_mm"
    spec, err = spec_and_error(model.eval(), x)
    assert err < 1e-4 and spec.unsupported == []
    expert = _group(spec, "model.model.layers.1.mlp.gate.weight", 0)
    assert expert is not None and _group(spec, "model.model.layers.1.mlp.experts.gate_up_proj", 0) == expert
