"""Inferred maps on timm and transformers models: which spaces take a map, which are pinned and why, and
invariance under random elements of every inferred kind (float64 copies; float32 round-off where a model
computes its norms in float32 or runs grouped matmuls that take no float64).

What is inferred (2 layers, tiny widths):

| model | residual stream | q/k per head | v/o per head |
|---|---|---|---|
| timm ViT, DeiT | orthogonal, centred, 5 norms folded | orthogonal (fused qkv) | invertible |
| timm Swin | last stage only (stage 0: the patch norm writes the stream; stages 1-2: merging's norm shift, reduction has no bias) | orthogonal | invertible |
| timm ConvNeXt | pinned: depthwise convolution | - | - |
| timm EVA-02 | pinned: LayerNorm shift into qkv, whose bias is a concatenation with a buffer | rotary (RoPE) | invertible |
| Llama, Qwen2, Qwen3, Mixtral | orthogonal (RMSNorm) | rotary (RoPE) | invertible |
| Gemma (tied head), GPT-2 (tied head) | pinned: the final norm would fold into the tied embedding | rotary / orthogonal | invertible |
| GPT-2 untied | pinned: the final LayerNorm's shift, lm_head has no bias | orthogonal | invertible |
| Gemma untied | orthogonal, 1 + w folds | rotary | invertible |
| BERT | pinned: post-norm (a residual add reads the norm) | invertible | invertible |
"""
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import autoperm
from autoperm.maps import check_symmetries, infer_maps

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
timm = pytest.importorskip("timm")
KINDS = ("orthogonal", "invertible", "rotary", "scale")


def _timm(name, size, **kw):
    def build():
        return timm.create_model(name, pretrained=False, **kw), (torch.randn(2, 3, size, size),)
    return build


def _hf(fn, **cfg):
    def build():
        import test_hf_families as hf
        if cfg:
            return hf._lm(*fn, **{**hf.LLAMA_LIKE, **cfg}) if isinstance(fn, tuple) else fn(**cfg)
        return getattr(hf, fn)()
    return build


def _gpt2_untied():
    import test_hf_families as hf
    return hf._lm("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64,
                  bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)


MODELS = {
    "vit": _timm("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2),
    "deit": _timm("deit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2),
    "swin": _timm("swin_tiny_patch4_window7_224", 56, img_size=56, depths=(1, 1, 1, 1)),
    "convnext": _timm("convnext_atto", 32),
    "eva02": _timm("eva02_tiny_patch14_224", 28, img_size=28, depth=2, num_classes=10),
    "llama": _hf("llama"), "qwen2": _hf("qwen2"), "qwen3": _hf("qwen3"), "gemma": _hf("gemma"),
    "gemma_untied": _hf(("GemmaForCausalLM", "GemmaConfig"), head_dim=8, tie_word_embeddings=False),
    "gpt2": _hf("gpt2"), "gpt2_untied": _gpt2_untied, "bert": _hf("bert"),
    "mixtral": _hf(("MixtralForCausalLM", "MixtralConfig"), num_local_experts=4, num_experts_per_tok=2),
}
# stream: (kind, centred, folds) of the residual-stream map, or a phrase of the reason it is pinned
STREAM = {
    "vit": ("orthogonal", True, 5), "deit": ("orthogonal", True, 5), "swin": ("orthogonal", True, 3),
    "convnext": "grouped (depthwise) convolution", "eva02": "shift cannot fold",
    "llama": ("orthogonal", False, 5), "qwen2": ("orthogonal", False, 5), "qwen3": ("orthogonal", False, 5),
    "mixtral": ("orthogonal", False, 5), "gemma_untied": ("orthogonal", False, 5),
    "gemma": "tied", "gpt2": "tied", "gpt2_untied": "no bias", "bert": "reads the normalised values",
}
# (q/k kind, v/o kind) of layer 0's attention maps
HEADS = {"vit": ("orthogonal", "invertible"), "deit": ("orthogonal", "invertible"), "swin": ("orthogonal", "invertible"),
         "gpt2": ("orthogonal", "invertible"), "gpt2_untied": ("orthogonal", "invertible"),
         "bert": ("invertible", "invertible")}
ROPE = {"eva02", "llama", "qwen2", "qwen3", "mixtral", "gemma", "gemma_untied"}
LOW_PRECISION = {"llama", "qwen2", "qwen3", "mixtral", "gemma", "gemma_untied"}  # norms in float32 / grouped mm
_CACHE: dict = {}


def built(name):
    if name not in _CACHE:
        torch.manual_seed(0)
        model, x = MODELS[name]()
        autoperm.randomize_(model, 0)
        model.eval()
        _CACHE[name] = model, x, infer_maps(model, x, kinds=KINDS)
    return _CACHE[name]


def _stream(spec):
    return [m for m in spec.maps if m.blocks == 1 and m.folds]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_stream_map_or_pin(name):
    model, x, spec = built(name)
    want, got = STREAM[name], _stream(spec)
    if isinstance(want, str):
        assert got == [] if name != "swin" else True
        assert any(p.kind == "orthogonal" and want in p.reason for p in spec.map_pins), \
            sorted({p.reason for p in spec.map_pins if p.kind == "orthogonal"})
    else:
        assert [(m.kind, m.center, len(m.folds)) for m in got][-1:] == [want]


@pytest.mark.parametrize("name", sorted(HEADS))
def test_attention_head_maps(name):
    model, x, spec = built(name)
    per_head = [m for m in spec.maps if m.blocks > 1]
    assert len(per_head) >= 2
    qk, vo = per_head[0], per_head[1]
    assert (qk.kind, vo.kind) == HEADS[name]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_inferred_maps_keep_the_function(name):
    model, x, spec = built(name)
    dtype = None if name == "mixtral" else torch.float64
    tol = 1e-5 if name in LOW_PRECISION else 1e-10
    errs = {k: check_symmetries(model, spec, x, seed=1, kinds=(k,), dtype=dtype) for k in {m.kind for m in spec.maps}}
    errs["all"] = check_symmetries(model, spec, x, seed=2, dtype=dtype)
    assert max(errs.values()) < tol, errs


def test_a_wrong_map_changes_the_function():
    model, x, spec = built("vit")
    stream = _stream(spec)[0]
    qk = next(m for m in spec.maps if m.blocks > 1)
    bad = [dataclasses.replace(stream, center=False),  # LayerNorm needs the all-ones vector fixed
           dataclasses.replace(qk, kind="invertible"),  # fused q/k: one map on both sides of q·kᵀ
           dataclasses.replace(stream, folds=()),  # norm scales left on the stream
           dataclasses.replace(stream, sites=stream.sites[1:])]  # one writer of the stream left out
    for m in bad:
        wrong = dataclasses.replace(spec, maps=[m])
        assert check_symmetries(model, wrong, x, seed=1, permute=False, dtype=torch.float64) > 1e-3, m.name
