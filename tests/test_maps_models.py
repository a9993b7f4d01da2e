"""Inferred maps on timm and transformers models: which spaces take a map, which are pinned and why, and
invariance under random elements of every inferred kind (float64 copies; float32 round-off where a model
computes its norms in float32)."""
import sys
from pathlib import Path

import pytest
import torch

from autoperm.maps import check_symmetries, infer_maps

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
timm = pytest.importorskip("timm")


def _summary(spec):
    """(stream maps, per-head maps, others) by kind and the pinned reasons, for assertions."""
    out = {}
    for m in spec.maps:
        out.setdefault((m.kind, m.blocks > 1, m.center, len(m.folds) > 0), []).append(m)
    return out


def _check_all(model, spec, x, tol):
    errs = {}
    for kind in sorted({m.kind for m in spec.maps}):
        errs[kind] = check_symmetries(model, spec, x, seed=3, kinds=(kind,), dtype=torch.float64)
    errs["all"] = check_symmetries(model, spec, x, seed=4, dtype=torch.float64)
    assert max(errs.values()) < tol, errs
    return errs


def test_vit_stream_heads_and_mlp():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = infer_maps(model, x, kinds=("orthogonal", "invertible", "scale"))
    s = _summary(spec)
    (stream,) = s[("orthogonal", False, True, True)]  # LayerNorm stream: centred, norms folded
    assert {f.weight for f in stream.folds} == {"blocks.0.norm1.weight", "blocks.0.norm2.weight",
                                                 "blocks.1.norm1.weight", "blocks.1.norm2.weight", "norm.weight"}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight"} <= {t.key for t in stream.sites}
    assert len(s[("orthogonal", True, False, False)]) == 2  # q/k per head: fused qkv reads it on both sides
    vo = s[("invertible", True, False, False)]
    assert len(vo) == 2 and all(m.blocks == 3 and m.size == 64 for m in vo)
    assert [p.reason for p in spec.map_pins if p.where == "blocks.0.mlp.fc1.weight:0"][0].startswith("nonlinear op gelu")
    _check_all(model, spec, x, 1e-10)


def test_tiny_llama_stream_and_value_heads():
    import test_hf_families as hf
    model, x = hf.llama()
    model.eval()
    spec = infer_maps(model, x, kinds=("orthogonal", "invertible", "scale"))
    s = _summary(spec)
    (stream,) = s[("orthogonal", False, False, True)]  # RMSNorm stream: not centred
    assert len(stream.folds) == 5
    vo = s[("invertible", True, False, False)]
    assert len(vo) == 2 and all(m.blocks == 2 and m.size == 8 for m in vo)
    assert all(len([t for t in m.sites if t.key.endswith("o_proj.weight")]) == 2 for m in vo)  # 2 q heads per kv head
    _check_all(model, spec, x, 1e-6)  # the RMSNorm statistic is computed in float32
