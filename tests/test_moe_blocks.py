"""Each expert's hidden units permute on their own (the hidden group is declared per expert) where the graph proves it.

Behind a grouped matmul whose rows are sorted by the expert ids that address the weights, row r only
meets expert e(r)'s weight, so every expert may take its own hidden permutation; a per-expert bias
picked by the sorted ids goes with it. A parameter that indexes hidden units the same way for all
experts keeps one permutation shared by all. Weights gathered by expert id (``bmm``/``index_add``
styles) keep the shared form: their gathered axis includes the pinned top-k rank axis, whose
positions no rule ties to the ids.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import autoperm
from autoperm.testing._moe import FusedMoE, MoEModel
from rule_helpers import spec_and_error

TOL = 1e-5


def _hidden(spec, key):
    return spec.axes[key][2]["g"]


def test_grouped_experts_hidden_units_are_per_expert():
    spec, err = spec_and_error(MoEModel(style="grouped"), torch.randint(0, 32, (2, 6)))
    assert err < TOL and spec.unsupported == []
    for layer in range(2):
        expert = spec.axes[f"moes.{layer}.router.weight"][0]["g"]
        assert spec.per[_hidden(spec, f"moes.{layer}.down_proj")] == expert
    p = autoperm.random_permutation(spec, seed=1)
    hidden = _hidden(spec, "moes.0.down_proj")
    assert p[hidden].shape == (4, 8) and len({tuple(r.tolist()) for r in p[hidden]}) > 1


@pytest.mark.parametrize("how", ["gather", "scatter"])
def test_gathered_experts_keep_one_hidden_permutation(how):
    spec, err = spec_and_error(MoEModel(style=how), torch.randint(0, 32, (2, 6)))
    assert err < TOL
    assert _hidden(spec, "moes.0.down_proj") not in spec.per


class _HiddenBias(FusedMoE):
    """The grouped path with a bias over the hidden units: ``"shared"`` adds one bias for every expert (hidden
    unit j of every expert meets bias[j]: one permutation for all); ``"picked"`` picks each row's expert's bias
    by the sorted ids (as GPT-OSS does); ``"shifted"`` picks by ids shifted by one (read as numbers: the
    experts are pinned and nothing is per expert)."""

    def __init__(self, *args, bias="shared", **kwargs):
        super().__init__(*args, **kwargs)
        self.bias = bias
        n = self.gate_up_proj.shape[1] // 2
        self.hidden_bias = torch.nn.Parameter(torch.randn(n) if bias == "shared" else torch.randn(self.experts, n))

    def forward(self, x):
        h = x.reshape(-1, x.shape[-1])
        w, ids = torch.topk(self.router(h).softmax(-1), self.k, dim=-1)
        ids_g, perm = torch.sort(ids.reshape(-1))
        rows = h[perm // self.k]
        offs = torch.cumsum(torch.histc(ids_g.float(), bins=self.experts, min=0, max=self.experts - 1), 0,
                            dtype=torch.int32)
        gate, up = torch.ops.autoperm.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
        bias = self.hidden_bias if self.bias == "shared" else \
            self.hidden_bias[(ids_g + 1) % self.experts if self.bias == "shifted" else ids_g]
        out = torch.ops.autoperm.grouped_mm(F.silu(gate) * up + bias, self.down_proj.transpose(1, 2), offs)
        out = out * w.reshape(-1)[perm].unsqueeze(-1)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.size(0))
        return x + out[inv].view(h.shape[0], self.k, -1).sum(1)


def test_a_hidden_bias_shared_by_all_experts_keeps_one_permutation():
    spec, err = spec_and_error(_HiddenBias(8, 4, experts=4, k=2), torch.randn(6, 8))
    assert err < TOL
    hidden = spec.axes["hidden_bias"][0]["g"]
    assert spec.axes["router.weight"][0] is not None  # the experts still move
    assert hidden == _hidden(spec, "down_proj") and hidden not in spec.per


def test_planted_full_group_element_of_a_grouped_moe_is_recovered():
    torch.manual_seed(0)
    model = MoEModel(style="grouped")
    autoperm.randomize_(model, 0)
    model.eval()
    spec = autoperm.infer_spec(model, torch.randint(0, 32, (2, 6)))
    assert spec.per
    a = model.state_dict()
    p = autoperm.random_permutation(spec, seed=3)
    b = autoperm.apply_permutation(spec, p, a)
    inv = autoperm.inverse_permutation(p)
    model_b = copy.deepcopy(model)
    model_b.load_state_dict(b)
    wm = autoperm.weight_matching(spec, a, b, progress=False)
    am = autoperm.activation_matching(spec, model, model_b, [torch.randint(0, 32, (8, 6)) for _ in range(2)],
                                      progress=False)
    for g in spec.group_sizes:
        assert torch.equal(wm[g], inv[g]), g
        assert torch.equal(am[g], inv[g]), g


@pytest.mark.parametrize("bias", ["picked", "shifted"])
def test_a_per_expert_bias_picked_by_the_sorted_ids_goes_with_its_expert(bias):
    spec, err = spec_and_error(_HiddenBias(8, 4, experts=4, k=2, bias=bias), torch.randn(6, 8))
    assert err < TOL
    hidden = spec.axes["hidden_bias"][1]["g"]
    if bias == "shifted":
        assert spec.axes["router.weight"][0] is None and not spec.per
    else:
        assert spec.axes["hidden_bias"][0] == spec.axes["router.weight"][0] is not None
        assert spec.per[hidden] == spec.axes["router.weight"][0]["g"]
