"""Planted recovery over the full group: a random element (independent per-head and per-group inner
permutations plus block permutations) applied to a model is undone exactly by weight and activation matching."""
import copy

import pytest
import torch

import autoperm
from rule_helpers import GroupNet
from autoperm.permutation import apply_permutation, compose_permutations, inverse_permutation, random_permutation


def vit():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2)
    return m, torch.randn(8, 3, 32, 32)


def llama_gqa():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50, use_cache=False)
    return transformers.LlamaModel(cfg), torch.randint(0, 50, (4, 6))


def group_net():
    return GroupNet(), torch.randn(8, 3, 8, 8)


@pytest.mark.parametrize("make", [vit, llama_gqa, group_net])
def test_planted_full_group_element_is_undone(make):
    torch.manual_seed(0)
    m, x = make()
    m = autoperm.randomize_(m.eval())
    spec = autoperm.infer_spec(m, x)
    assert spec.per  # the model has groups independent per block
    a = m.state_dict()
    planted = random_permutation(spec, seed=5)
    assert any((planted[d] != planted[d][:1]).any() for d in spec.per)  # not a shared-inner element
    b = apply_permutation(spec, planted, a)
    truth = inverse_permutation(planted, spec)
    mb = copy.deepcopy(m)
    mb.load_state_dict(b)
    for perm in (autoperm.weight_matching(spec, a, b), autoperm.activation_matching(spec, m, mb, [x])):
        aligned = apply_permutation(spec, perm, b)
        assert all(torch.equal(aligned[k], a[k]) for k in a)
        assert all(torch.equal(perm[g], truth[g]) for g in spec.group_sizes)
        ident = compose_permutations(planted, perm, spec)
        assert all(torch.equal(ident[g], torch.arange(n).expand_as(ident[g])) for g, n in spec.group_sizes.items())


def test_weight_matching_with_blocks_is_deterministic_and_accepts_a_full_group_init():
    torch.manual_seed(0)
    m, x = group_net()
    m = autoperm.randomize_(m.eval())
    spec = autoperm.infer_spec(m, x)
    a = m.state_dict()
    b = autoperm.randomize_(GroupNet().eval(), seed=1).state_dict()
    p1 = autoperm.weight_matching(spec, a, b, seed=3, restarts=2)
    p2 = autoperm.weight_matching(spec, a, b, seed=3, restarts=2)
    assert all(torch.equal(p1[g], p2[g]) for g in p1)
    p3 = autoperm.weight_matching(spec, a, b, init=p1)
    from autoperm.matching._blocks import block_objective
    keys = [k for k, ex in spec.axes.items() if any(ex)]
    assert block_objective(spec, a, b, p3, keys) >= block_objective(spec, a, b, p1, keys) - 1e-9
    shared = autoperm.weight_matching(autoperm.PermutationSpec.from_axes(spec.axes, spec.group_sizes, spec.pinned,
                                                                         spec.shapes), a, b, seed=3, restarts=2)
    from autoperm.matching._blocks import expand_rows
    assert block_objective(spec, a, b, p1, keys) >= block_objective(spec, a, b, expand_rows(spec, shared), keys) - 1e-9


def test_blocks_given_by_another_axis_fused_experts():
    """Fused expert weights [E, I, C] with each expert's hidden units permuting on their own."""
    spec = autoperm.PermutationSpec.from_axes(
        {"w1": [{"g": "e"}, {"g": "i"}, None], "w2": [{"g": "e"}, None, {"g": "i"}], "gate": [{"g": "e"}, None]},
        {"e": 4, "i": 6}, per={"i": "e"})
    gen = torch.Generator().manual_seed(0)
    a = {"w1": torch.randn(4, 6, 5, generator=gen), "w2": torch.randn(4, 5, 6, generator=gen),
         "gate": torch.randn(4, 5, generator=gen)}
    planted = random_permutation(spec, seed=2)
    b = apply_permutation(spec, planted, a)
    perm = autoperm.weight_matching(spec, a, b)
    assert perm["i"].shape == (4, 6)
    aligned = apply_permutation(spec, perm, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
