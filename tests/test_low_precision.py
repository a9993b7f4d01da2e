"""bfloat16 and float16 models through every function-preservation check: align, mergekit, fusion_bench.

In its own dtype a sound permutation of a bfloat16 model already moves the outputs by about 1e-3
(round-off), so the checks decide on float32 copies (autoperm.equivalence). Each end-to-end test
plants a permutation (B is A permuted, in float32, then both are cast), aligns B with the real
weight matching, and requires the written weights to be A bit for bit in the stored dtype; a
deliberately wrong permutation (two rows of one weight swapped without their coupled axes) must
still fail in every dtype, naming the dtype, the tolerance and the round-off floor.
"""
import copy
import os

import pytest
import torch

import autoperm
import tiny_models
from autoperm._float64 import dtype_name
from autoperm.equivalence import same_function
from autoperm.plugins import _align

LOW = [torch.bfloat16, torch.float16]
ALL = [torch.float64, torch.float32, *LOW]
_ids = dtype_name


def _convnet(dtype: str = "float32", seed: int = 0):
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    model = autoperm.randomize_(timm.create_model("test_resnet", pretrained=False, num_classes=4).eval(), seed)
    return model.to(getattr(torch, dtype)), (torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)),)


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed")


FACTORIES = {"convnet": _convnet, "llama": tiny_models.llama, "bert": tiny_models.bert}


def _planted(kind: str, dtype: torch.dtype, seed: int = 3):
    """``(a, b, x, spec)``: B is A with every group permuted at random, both then cast to ``dtype``."""
    if kind != "convnet":
        _transformers()
    a, x = FACTORIES[kind]()
    spec = autoperm.infer_spec(a, x)
    b = copy.deepcopy(a)
    autoperm.load_state_(b, autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed), a.state_dict()))
    return a.to(dtype), b.to(dtype), x, spec


def _assert_bitwise(state, like):
    """Every tensor of ``state`` (present in ``like``) has ``like``'s dtype and bits."""
    for k, v in state.items():
        assert v.dtype == like[k].dtype and torch.equal(v, like[k]), k


@pytest.fixture
def wrong(monkeypatch):
    """Every alignment swaps two output rows of one permuted weight and leaves its coupled axes alone."""
    real = _align.apply_permutation

    def broken(spec, perm, state):
        out = real(spec, perm, state)
        key = next(k for k, ex in spec.axes.items() if ex and ex[0] is not None and out[k].dim() >= 2)
        t = out[key].clone()
        t[[0, 1]] = t[[1, 0]]
        out[key] = t
        return out

    monkeypatch.setattr(_align, "apply_permutation", broken)


def _failure_message(dtype: torch.dtype) -> str:
    name = dtype_name(dtype)
    return rf"relative output change \S+ in \S+.* > tolerance \S+; {name} round-off floor \S+"


# -- the decision ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_same_function_decides_on_float32_copies(dtype):
    a, b, x, spec = _planted("llama", dtype)
    before = copy.deepcopy(a.state_dict())
    v = same_function(a, a.state_dict(), b.state_dict(), x)
    assert v.ok and v.dtype == torch.float32 and v.stored == dtype and v.tolerance == 1e-4
    assert v.change < 1e-5 < v.floor  # float32 round-off, far below the stored dtype's floor
    own = same_function(a, a.state_dict(), b.state_dict(), x, upcast=False)  # in the stored dtype
    assert own.ok and own.dtype == dtype and own.tolerance == max(1e-4, 3 * own.floor)
    _assert_bitwise(a.state_dict(), before)  # nothing mutated


@pytest.mark.parametrize("upcast", [True, False], ids=["copies", "stored-dtype"])
@pytest.mark.parametrize("dtype", ALL, ids=_ids)
def test_wrong_permutation_fails_in_every_dtype(dtype, upcast):
    a, _, x, spec = _planted("llama", dtype)
    state = dict(a.state_dict())
    key = "model.layers.0.mlp.gate_proj.weight"
    state[key] = state[key][torch.randperm(len(state[key]), generator=torch.Generator().manual_seed(0))]
    v = same_function(a, a.state_dict(), state, x, upcast=upcast)
    assert not v.ok and v.stored == dtype
    if upcast:
        assert v.change > 100 * v.tolerance  # on wide copies, not a close call
    import re

    assert re.fullmatch(_failure_message(dtype), str(v)), str(v)


def test_float64_decides_where_float32_round_off_exceeds_the_tolerance():
    a, b, x, _ = _planted("convnet", torch.float32)  # (Llama's RMSNorm computes in float32 whatever its dtype)
    v = same_function(a, a.state_dict(), b.state_dict(), x, tol=1e-9)  # float32 round-off is about 1e-7
    assert v.ok and v.dtype == torch.float64 and v.tolerance == 1e-9 and v.float32_change > 1e-9 > v.change
    assert "in float64 copies of the float32 weights (float32: " in str(v)


class _Bf16Only(torch.nn.Module):
    """Runs in bfloat16 only, as kernels written for one dtype do."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        if x.dtype != torch.bfloat16:
            raise TypeError(f"expected bfloat16 input, got {x.dtype}")
        return self.b(torch.relu(self.a(x)))


def test_a_model_that_cannot_run_wider_is_decided_in_its_own_dtype():
    model = autoperm.randomize_(_Bf16Only()).bfloat16().eval()
    x = torch.randn(8, 4).bfloat16()
    spec = autoperm.infer_spec(model, x)
    good = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, 1), model.state_dict())
    v = same_function(model, model.state_dict(), good, x)
    assert v.ok and v.dtype == torch.bfloat16 and v.tolerance == max(1e-4, 3 * v.floor)
    bad = dict(good)
    bad["a.weight"] = bad["a.weight"].flip(0)  # hidden units moved without b's columns
    v = same_function(model, model.state_dict(), bad, x)
    assert not v.ok and v.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_check_invariance_of_a_low_precision_model(dtype):
    model, x = _convnet()
    model = model.to(dtype)
    spec = autoperm.infer_spec(model, x[0].to(dtype))
    assert autoperm.check_invariance(model, spec, x) < 1e-5  # a float32 copy, float32 round-off
    assert all(p.dtype == dtype for p in model.parameters())  # the model itself is untouched
    v = autoperm.invariance_verdict(model, spec, x)
    assert v.ok and v.dtype == torch.float32 and v.stored == dtype


def test_stored_dtype_keyword_for_from_pretrained():
    from autoperm.plugins._hf import _stored_dtype_kwarg

    assert _stored_dtype_kwarg("4.40.2") == {"torch_dtype": "auto"}
    assert _stored_dtype_kwarg("4.57.0.dev0") == {"dtype": "auto"} == _stored_dtype_kwarg("5.24.0")


# -- autoperm align ---------------------------------------------------------------------------------
def _cli_model(kind: str, dtype: torch.dtype) -> list[str]:
    if kind == "convnet":  # a float32 timm model reading low-precision checkpoints
        return ["--model", "test_resnet", "--model-arg", "num_classes=4", "--input-shape", "3,64,64"]
    return ["--model", f"tiny_models:{kind}", "--model-arg", f"dtype={dtype_name(dtype)}"]  # a low-precision model


def _save_pair(tmp_path, a, b):
    from autoperm.io import save_checkpoint

    save_checkpoint(a.state_dict(), tmp_path / "a.safetensors")
    save_checkpoint(b.state_dict(), tmp_path / "b.safetensors")
    return str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("kind", FACTORIES)
def test_cli_align(tmp_path, capsys, kind, dtype):
    from autoperm.cli import main
    from autoperm.io import read_state_dict

    a, b, _, spec = _planted(kind, dtype)
    pa, pb = _save_pair(tmp_path, a, b)
    out = str(tmp_path / "aligned.safetensors")
    assert main(["align", *_cli_model(kind, dtype), pa, pb, "-o", out]) == 0
    assert f"float32 copies of the {dtype_name(dtype)} weights <= tolerance" in capsys.readouterr().err
    written = read_state_dict(out)
    _assert_bitwise(written, a.state_dict())  # B's values moved, none rounded: A exactly, in its dtype
    unmoved = [k for k in written if not any(spec.axes.get(k) or [None])]
    _assert_bitwise({k: written[k] for k in unmoved}, b.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=_ids)
def test_cli_align_rejects_a_wrong_permutation(tmp_path, capsys, wrong, dtype):
    from autoperm.cli import main

    a, b, _, _ = _planted("convnet", dtype)
    pa, pb = _save_pair(tmp_path, a, b)
    out = tmp_path / "aligned.safetensors"
    assert main(["align", *_cli_model("convnet", dtype), pa, pb, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "nothing written" in err and not out.exists()
    import re

    assert re.search(_failure_message(dtype), err), err


# -- the mergekit pre-pass --------------------------------------------------------------------------
def _mergekit_scenario(tmp_path, kind, dtype):
    """A and B (A permuted) saved by transformers in ``dtype``, and a linear mergekit config over both."""
    pytest.importorskip("yaml")
    import yaml

    a, b, _, spec = _planted(kind, dtype)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    cfg = {"models": [{"model": "a", "parameters": {"weight": 0.5}}, {"model": "b", "parameters": {"weight": 0.5}}],
           "merge_method": "linear", "dtype": dtype_name(dtype)}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(cfg))
    return a, b, spec, str(tmp_path / "merge.yml")


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_mergekit_prepass_and_merge(tmp_path, kind, dtype):
    """``autoperm mergekit merge.yml -o aligned/`` writes the aligned folder; mergekit's linear merge of A
    and aligned B is A exactly, in the stored dtype."""
    import yaml

    from autoperm.cli import main
    from autoperm.plugins._hf import load_hf_model

    a, b, spec, config = _mergekit_scenario(tmp_path, kind, dtype)
    assert main(["mergekit", config, "-o", str(tmp_path / "aligned")]) == 0
    aligned = load_hf_model(str(tmp_path / "aligned" / "01-b"))
    _assert_bitwise(aligned.state_dict(), a.state_dict())
    mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit)")
    del mergekit
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    merge_config = MergeConfiguration.model_validate(yaml.safe_load(open(tmp_path / "aligned" / "mergekit_config.yml")))
    run_merge(merge_config, str(tmp_path / "merged"), MergeOptions(device="cpu", copy_tokenizer=False))
    _assert_bitwise(load_hf_model(str(tmp_path / "merged")).state_dict(), a.state_dict())


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_mergekit_prepass_rejects_a_wrong_permutation(tmp_path, wrong, dtype):
    from autoperm.plugins.mergekit import prepare_config

    _, _, _, config = _mergekit_scenario(tmp_path, "llama", dtype)
    # activation matching loads the models (the in-memory path; --method weight streams, checked in test_folder)
    with pytest.raises(RuntimeError, match=_failure_message(dtype) + r".*not written"):
        prepare_config(config, str(tmp_path / "aligned"), method="activation")
    assert not os.path.exists(tmp_path / "aligned" / "01-b")


# -- fusion_bench -----------------------------------------------------------------------------------
def _fusion_bench():
    return pytest.importorskip("fusion_bench", reason="fusion_bench is not installed (pip install fusion-bench)")


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
@pytest.mark.parametrize("kind", FACTORIES)
def test_fusion_bench(kind, dtype):
    _fusion_bench()
    from fusion_bench.method import SimpleAverageAlgorithm

    from autoperm.plugins.fusion_bench import AutopermAlignment

    a, b, _, _ = _planted(kind, dtype)
    before = copy.deepcopy(b.state_dict())
    algo = AutopermAlignment(input_shape=[3, 64, 64] if kind == "convnet" else None)
    pool = algo.run({"a": a, "b": b})
    _assert_bitwise(pool.load_model("b").state_dict(), a.state_dict())
    merged = AutopermAlignment(input_shape=algo.input_shape, merge=SimpleAverageAlgorithm()).run({"a": a, "b": b})
    _assert_bitwise(merged.state_dict(), a.state_dict())  # the average of A and aligned B is A
    _assert_bitwise(b.state_dict(), before)  # the input pool is untouched


@pytest.mark.parametrize("dtype", LOW, ids=_ids)
def test_fusion_bench_rejects_a_wrong_permutation(wrong, dtype):
    _fusion_bench()
    from autoperm.plugins.fusion_bench import AutopermAlignment

    a, b, _, _ = _planted("convnet", dtype)
    with pytest.raises(RuntimeError, match=_failure_message(dtype)):
        AutopermAlignment(input_shape=[3, 64, 64]).run({"a": a, "b": b})
