"""Alignment in front of other tools: the shared step, fusion_bench's algorithm, mergekit's pre-pass.

fusion_bench and mergekit are optional (not in the test extra): their end-to-end tests are skipped
when the package is absent. Each plants a permutation (B is A permuted), so after alignment and an
equal-weight average the merged model must be A exactly. Matchers are stood in by the planted
inverse so these tests check the plumbing; the real matchers get the same test when present.
"""
import copy
import os

import pytest
import torch
from torch import nn

import autoperm
from autoperm.plugins import align_states


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _planted(model, x, seed=3):
    spec = autoperm.infer_spec(model, x)
    perm = autoperm.random_permutation(spec, seed=seed)
    b = copy.deepcopy(model)
    b.load_state_dict(autoperm.apply_permutation(spec, perm, model.state_dict()))
    return spec, perm, b


@pytest.fixture
def stand_in(monkeypatch):
    """Install matchers that return a given permutation: ``stand_in(perm)``."""

    def install(perm):
        for m in ("weight", "activation", "ste"):
            monkeypatch.setattr(autoperm, f"{m}_matching", lambda *a, **k: perm, raising=False)

    return install


def _equal_states(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


# -- the shared step -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["weight", "activation", "ste"])
def test_align_states_aligns_all_to_the_first(stand_in, method):
    a = _mlp()
    spec, perm, b = _planted(a, torch.randn(2, 4))
    stand_in(autoperm.inverse_permutation(perm))
    aligned, perms = align_states(spec, [a.state_dict(), b.state_dict(), b.state_dict()], method, model=a,
                                  inputs=[torch.randn(8, 4)])
    assert len(aligned) == 3 and all(torch.equal(p, torch.arange(len(p))) for p in perms[0].values())
    for s in aligned[1:]:
        _equal_states(s, a.state_dict())


def test_align_states_errors(monkeypatch):
    a = _mlp()
    spec = autoperm.infer_spec(a, torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown method"):
        align_states(spec, [a.state_dict()] * 2, "magic")
    monkeypatch.setattr(autoperm, "activation_matching", lambda *a, **k: None, raising=False)
    with pytest.raises(ValueError, match="needs a model and data batches"):
        align_states(spec, [a.state_dict()] * 2, "activation")
    monkeypatch.delattr(autoperm, "ste_matching", raising=False)
    with pytest.raises(RuntimeError, match="ste_matching is not available"):
        align_states(spec, [a.state_dict()] * 2, "ste", model=a, inputs=[])


# -- fusion_bench ----------------------------------------------------------------------------------
def _fusion_bench():
    return pytest.importorskip("fusion_bench", reason="fusion_bench is not installed (pip install fusion-bench)")


def test_fusion_bench_aligns_the_pool_and_hands_it_on(stand_in):
    fb = _fusion_bench()
    from autoperm.plugins.fusion_bench import AutopermAlignment

    a = _mlp()
    spec, perm, b = _planted(a, torch.randn(2, 4))
    stand_in(autoperm.inverse_permutation(perm))
    pretrained = _mlp(seed=9)
    before = copy.deepcopy(b.state_dict())
    pool = fb.BaseModelPool({"_pretrained_": pretrained, "a": a, "b": b})
    algo = AutopermAlignment(input_shape=[4])
    out = algo.run(pool)
    assert isinstance(out, fb.BaseModelPool)
    assert out.model_names == ["a", "b"]
    _equal_states(out.load_model("b").state_dict(), a.state_dict())
    assert out.load_model("_pretrained_") is pretrained  # special models pass through unaligned
    assert set(algo.permutations) == {"a", "b"} and algo.spec.group_sizes == spec.group_sizes
    _equal_states(b.state_dict(), before)  # the input pool is untouched


def test_fusion_bench_config_with_a_merge_method(stand_in):
    """As a fusion_bench YAML config would build it: alignment, then SimpleAverage on the aligned pool."""
    _fusion_bench()
    from fusion_bench.utils import instantiate
    from omegaconf import OmegaConf

    timm = pytest.importorskip("timm")
    a = autoperm.randomize_(timm.create_model("test_resnet", pretrained=False, num_classes=4).eval())
    spec, perm, b = _planted(a, torch.randn(2, 3, 160, 160))
    stand_in(autoperm.inverse_permutation(perm))
    algo = instantiate(OmegaConf.create({
        "_target_": "autoperm.plugins.fusion_bench.AutopermAlignment", "method": "weight",
        "merge": {"_target_": "fusion_bench.method.SimpleAverageAlgorithm"}}))
    merged = algo.run({"a": a, "b": b})  # a plain dict becomes a BaseModelPool; timm config gives the inputs
    _equal_states(merged.state_dict(), a.state_dict())  # the average of A and aligned B is A


@pytest.mark.skipif(not hasattr(autoperm, "weight_matching"), reason="autoperm.weight_matching not available yet")
def test_fusion_bench_with_real_weight_matching():
    _fusion_bench()
    from fusion_bench.method import SimpleAverageAlgorithm

    from autoperm.plugins.fusion_bench import AutopermAlignment

    a = _mlp()
    _, _, b = _planted(a, torch.randn(2, 4))
    merged = AutopermAlignment(input_shape=[4], merge=SimpleAverageAlgorithm()).run({"a": a, "b": b})
    _equal_states(merged.state_dict(), a.state_dict())


# -- mergekit --------------------------------------------------------------------------------------
def _gpt2_dirs(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("yaml")
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    a = autoperm.randomize_(transformers.GPT2LMHeadModel(cfg).eval())
    spec, perm, b = _planted(a, (torch.randint(0, 100, (2, 8)),))
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text("{}")  # other files travel with the aligned copy
    return a, spec, perm


def _write_config(tmp_path, **extra):
    import yaml

    cfg = {"models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}],
           "merge_method": "linear", "dtype": "float32", **extra}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "merge.yml")


def test_mergekit_prepass_writes_aligned_folders_and_config(tmp_path, stand_in):
    import json

    import yaml

    from autoperm.plugins.mergekit import prepare_config

    a, spec, perm = _gpt2_dirs(tmp_path)
    stand_in(autoperm.inverse_permutation(perm))
    path = prepare_config(_write_config(tmp_path), str(tmp_path / "aligned"))
    cfg = yaml.safe_load(open(path))
    assert [m["model"] for m in cfg["models"]] == [str(tmp_path / "a"), str(tmp_path / "aligned" / "01-b")]
    assert cfg["merge_method"] == "linear" and cfg["models"][1]["parameters"] == {"weight": 0.5}
    files = set(os.listdir(tmp_path / "aligned" / "01-b"))
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "autoperm_permutation.json"} <= files
    saved = json.loads((tmp_path / "aligned" / "01-b" / "autoperm_permutation.json").read_text())
    assert saved["format"] == "autoperm.permutation"
    from autoperm.plugins._hf import load_hf_model

    _equal_states(load_hf_model(str(tmp_path / "aligned" / "01-b")).state_dict(), a.state_dict())
    assert not [p for p in os.listdir(tmp_path / "aligned") if p.startswith(".")]  # no temporary folders left


def test_mergekit_prepass_command_and_base_model(tmp_path, stand_in):
    import yaml

    from autoperm.cli import main

    a, spec, perm = _gpt2_dirs(tmp_path)
    stand_in(autoperm.inverse_permutation(perm))
    config = _write_config(tmp_path, base_model="a")
    assert main(["mergekit", config, "-o", str(tmp_path / "out")]) == 0
    cfg = yaml.safe_load(open(tmp_path / "out" / "mergekit_config.yml"))
    assert cfg["base_model"] == str(tmp_path / "a")
    assert main(["mergekit", config, "-o", str(tmp_path / "a")]) == 2  # never into an input folder


def test_mergekit_prepass_rejects_remote_models(tmp_path):
    pytest.importorskip("yaml")
    from autoperm.plugins.mergekit import prepare_config

    (tmp_path / "m.yml").write_text("models:\n- model: org/some-model\n- model: org/other\nmerge_method: linear\n")
    with pytest.raises(FileNotFoundError, match="not a local model folder"):
        prepare_config(str(tmp_path / "m.yml"), str(tmp_path / "out"))


@pytest.mark.parametrize("real", [False, True], ids=["stand-in", "weight_matching"])
def test_mergekit_merges_the_aligned_models(tmp_path, stand_in, real):
    """mergekit's linear merge of A and aligned B (B = A permuted) gives back A; unaligned it does not."""
    pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit)")
    if real and not hasattr(autoperm, "weight_matching"):
        pytest.skip("autoperm.weight_matching not available yet")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from autoperm.plugins._hf import load_hf_model
    from autoperm.plugins.mergekit import prepare_config

    a, spec, perm = _gpt2_dirs(tmp_path)
    if not real:
        stand_in(autoperm.inverse_permutation(perm))
    config = _write_config(tmp_path)
    aligned_config = prepare_config(config, str(tmp_path / "aligned"))
    options = MergeOptions(device="cpu", copy_tokenizer=False)
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(open(aligned_config)))
    run_merge(merge_config, str(tmp_path / "merged"), options)
    _equal_states(load_hf_model(str(tmp_path / "merged")).state_dict(), a.state_dict())

    naive_config = yaml.safe_load(open(config))
    for m in naive_config["models"]:  # absolute paths: mergekit takes a bare name for a Hub id
        m["model"] = str(tmp_path / m["model"])
    run_merge(MergeConfiguration.model_validate(naive_config), str(tmp_path / "naive"), options)
    naive = load_hf_model(str(tmp_path / "naive")).state_dict()
    assert any(not torch.allclose(naive[k], v) for k, v in a.state_dict().items() if v.is_floating_point())


# -- extending autoperm: the user guide's custom-op rule ------------------------------------------------
def test_user_guide_custom_op_rule_example(capsys):
    """docs/user-guide.md's example runs as written and prints what its comments say."""
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "user-guide.md"), encoding="utf-8").read()
    block = next(b for b in (c.split("```")[0] for c in text.split("```python\n")[1:]) if "register_rule(" in b)
    exec(compile(block, "user-guide.md", "exec"), {"__name__": "user_guide_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["['linear_relu: no rule for mylib.linear_relu.default']", "{}", "{'fc1.weight:0': 32}",
                     "[('fc1.weight', 0), ('fc1.bias', 0), ('fc2.weight', 1)]", "True"]
