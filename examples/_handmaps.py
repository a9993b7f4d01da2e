"""Continuous symmetries of the two measured architectures, declared by hand (``autoperm.maps``).

Used by ``exp7_maps.py`` when the spec carries no maps of its own; each builder's maps are checked
with ``check_symmetries`` (random elements, float64) before they are used.

- :func:`llama_maps` (transformers Llama, wrapped so keys start with ``model.``): the residual stream
  (orthogonal, RMSNorm scales folded into q/k/v, gate/up and the LM head), per layer and key/value
  group a rotary map on q and k (angles shared by the query heads of the group), an invertible map on
  v/o per key/value head, and a positive scaling of SwiGLU's up projection against down's columns;
- :func:`vit_maps` (timm ViT): the residual stream (centred orthogonal: LayerNorm subtracts the
  mean; scales and shifts folded into qkv, fc1 and the head), per layer and head an invertible map on
  q/k and one on v/o.

Per-head maps are declared invertible: matched with ``kinds=("orthogonal",)`` they move over their
orthogonal subgroup, with ``"invertible"`` over all of it.
"""
from __future__ import annotations

from autoperm.maps import Fold, Map, Site


def llama_maps(model, prefix: str = "model.") -> list[Map]:
    cfg = model.model.config if hasattr(model, "model") else model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // hq
    rep = hq // hkv
    p = f"{prefix}model."
    lay = [f"{p}layers.{i}." for i in range(layers)]
    stream_sites = [Site(f"{p}embed_tokens.weight", 1, "primal"), Site(f"{prefix}lm_head.weight", 1, "dual")]
    folds = []
    for L in lay:
        stream_sites += [Site(f"{L}self_attn.o_proj.weight", 0, "primal"), Site(f"{L}mlp.down_proj.weight", 0, "primal")]
        stream_sites += [Site(f"{L}{k}.weight", 1, "dual") for k in
                         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
        folds += [Fold(f"{L}input_layernorm.weight", None,
                       tuple((f"{L}self_attn.{k}_proj.weight", 1, None) for k in "qkv")),
                  Fold(f"{L}post_attention_layernorm.weight", None,
                       tuple((f"{L}mlp.{k}_proj.weight", 1, None) for k in ("gate", "up")))]
    folds.append(Fold(f"{p}norm.weight", None, ((f"{prefix}lm_head.weight", 1, None),)))
    maps = [Map("stream", "orthogonal", d, sites=tuple(stream_sites), folds=tuple(folds),
                reason="residual stream read only through RMSNorm and linear layers")]
    half = hd // 2
    for i, L in enumerate(lay):
        q = [Site(f"{L}self_attn.q_proj.weight", 0, "primal", offset=j * hd, block_stride=rep * hd) for j in range(rep)]
        maps.append(Map(f"rotary.{i}", "rotary", hd, blocks=hkv, pairs=tuple((k, k + half) for k in range(half)),
                        sites=(*q, Site(f"{L}self_attn.k_proj.weight", 0, "primal", block_stride=hd)),
                        reason="RoPE pairs (i, i + head_dim/2) of a key/value group"))
        o = [Site(f"{L}self_attn.o_proj.weight", 1, "dual", offset=j * hd, block_stride=rep * hd) for j in range(rep)]
        maps.append(Map(f"vo.{i}", "invertible", hd, blocks=hkv,
                        sites=(Site(f"{L}self_attn.v_proj.weight", 0, "primal", block_stride=hd), *o),
                        reason="value head read only by its query heads' output columns"))
        inter = model.state_dict()[f"{L}mlp.up_proj.weight"].shape[0]
        maps.append(Map(f"swiglu.{i}", "scale", inter,
                        sites=(Site(f"{L}mlp.up_proj.weight", 0, "primal"), Site(f"{L}mlp.down_proj.weight", 1, "dual")),
                        reason="silu(gate) * up is linear in up"))
    return maps


def vit_maps(model) -> list[Map]:
    d = model.embed_dim
    blocks = list(model.blocks)
    heads = blocks[0].attn.num_heads
    hd = d // heads
    sites = [Site("cls_token", 2, "primal"), Site("pos_embed", 2, "primal"),
             Site("patch_embed.proj.weight", 0, "primal"), Site("patch_embed.proj.bias", 0, "primal"),
             Site("head.weight", 1, "dual")]
    folds = []
    maps = []
    for i in range(len(blocks)):
        B = f"blocks.{i}."
        sites += [Site(f"{B}attn.proj.weight", 0, "primal"), Site(f"{B}attn.proj.bias", 0, "primal"),
                  Site(f"{B}mlp.fc2.weight", 0, "primal"), Site(f"{B}mlp.fc2.bias", 0, "primal"),
                  Site(f"{B}attn.qkv.weight", 1, "dual"), Site(f"{B}mlp.fc1.weight", 1, "dual")]
        folds += [Fold(f"{B}norm1.weight", f"{B}norm1.bias", ((f"{B}attn.qkv.weight", 1, f"{B}attn.qkv.bias"),)),
                  Fold(f"{B}norm2.weight", f"{B}norm2.bias", ((f"{B}mlp.fc1.weight", 1, f"{B}mlp.fc1.bias"),))]
        w, b = f"{B}attn.qkv.weight", f"{B}attn.qkv.bias"
        maps.append(Map(f"qk.{i}", "invertible", hd, blocks=heads,
                        sites=(Site(w, 0, "primal", block_stride=hd), Site(b, 0, "primal", block_stride=hd),
                               Site(w, 0, "dual", offset=d, block_stride=hd), Site(b, 0, "dual", offset=d, block_stride=hd)),
                        reason="q·k per head, no RoPE"))
        maps.append(Map(f"vo.{i}", "invertible", hd, blocks=heads,
                        sites=(Site(w, 0, "primal", offset=2 * d, block_stride=hd),
                               Site(b, 0, "primal", offset=2 * d, block_stride=hd),
                               Site(f"{B}attn.proj.weight", 1, "dual", block_stride=hd)),
                        reason="value head read only by its output columns"))
    folds.append(Fold("norm.weight", "norm.bias", (("head.weight", 1, "head.bias"),)))
    maps.insert(0, Map("stream", "orthogonal", d, center=True, sites=tuple(sites), folds=tuple(folds),
                       reason="residual stream read only through LayerNorm and linear layers"))
    return maps
