"""Toy mixture-of-experts layers in the styles real code uses, for tests, planted recovery and the fuzzer.

``FusedMoE`` holds its experts as 3-D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I])
and computes them one of three ways: ``"grouped"`` sorts the token-expert pairs by expert id and runs
a grouped matmul (``torch._grouped_mm``'s semantics, any dtype) with offsets from a histogram of the sorted ids (transformers' default);
``"gather"`` indexes the weights by expert id and runs a batched matmul; ``"scatter"`` indexes the
weights the same way and adds each pair's output back to its token with ``index_add``.
``ModuleListMoE`` loops over an ``nn.ModuleList`` of experts and weighs each one's output by a
one-hot routing mask (Mixtral-style code). Both route with ``topk`` over a softmax of the router.

>>> import torch
>>> moe = FusedMoE(8, 4, experts=4, k=2, how="gather")
>>> moe(torch.randn(2, 3, 8)).shape
torch.Size([2, 3, 8])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedMoE", "ModuleListMoE", "MoEModel", "grouped_mm"]


@torch.library.custom_op("autoperm::grouped_mm", mutates_args=())
def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of ``input`` times ``weight[e]`` (``torch._grouped_mm`` in any float dtype)."""
    out, start = input.new_zeros(input.shape[0], weight.shape[2]), 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = input[start:end] @ weight[e]
        start = end
    return out


@grouped_mm.register_fake
def _(input, weight, offs):
    return input.new_empty(input.shape[0], weight.shape[2])


def _route(router: nn.Linear, x: torch.Tensor, k: int, bias: torch.Tensor | None = None):
    logits = router(x)
    probs = logits.softmax(-1)
    weights, ids = torch.topk(probs if bias is None else probs + bias, k, dim=-1)
    if bias is not None:
        weights = probs.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True), ids


class FusedMoE(nn.Module):
    """Experts as fused 3-D parameters; routing by top-k over a (optionally biased) softmax."""

    def __init__(self, dim: int, hidden: int, experts: int = 4, k: int = 2, how: str = "grouped",
                 router_bias: bool = False):
        super().__init__()
        if how not in ("grouped", "gather", "scatter"):
            raise ValueError(f"how must be 'grouped', 'gather' or 'scatter', got {how!r}")
        self.k, self.how, self.experts = k, how, experts
        self.router = nn.Linear(dim, experts, bias=False)
        self.score_bias = nn.Parameter(torch.zeros(experts)) if router_bias else None
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, dim) / dim ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, dim, hidden) / hidden ** 0.5)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        w, ids = _route(self.router, h, self.k, self.score_bias)
        flat_ids, flat_w = ids.reshape(-1), w.reshape(-1)
        if self.how == "grouped":
            ids_g, perm = torch.sort(flat_ids)
            rows = h[perm // self.k]
            counts = torch.histc(ids_g.float(), bins=self.experts, min=0, max=self.experts - 1)
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            gate, up = torch.ops.autoperm.grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
            out = torch.ops.autoperm.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs)
            out = out * flat_w[perm].unsqueeze(-1)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.size(0))
            out = out[inv].view(h.shape[0], self.k, -1).sum(1)
        else:
            rows = h.repeat_interleave(self.k, dim=0)
            gate, up = torch.bmm(self.gate_up_proj[flat_ids], rows.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
            out = torch.bmm(self.down_proj[flat_ids], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)
            out = out * flat_w.unsqueeze(-1)
            if self.how == "gather":
                out = out.view(h.shape[0], self.k, -1).sum(1)
            else:
                tokens = torch.arange(h.shape[0]).repeat_interleave(self.k, dim=0)
                out = torch.zeros_like(h).index_add(0, tokens, out)
        return out.reshape(shape)


class _Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False), \
            nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ModuleListMoE(nn.Module):
    """Experts as an ``nn.ModuleList``, weighed per token by a one-hot mask of the top-k choice."""

    def __init__(self, dim: int, hidden: int, experts: int = 4, k: int = 2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(dim, hidden) for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        w, ids = _route(self.router, h, self.k)
        combine = (F.one_hot(ids, len(self.experts)) * w.unsqueeze(-1)).sum(1)  # (tokens, experts)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            out = out + combine[:, e:e + 1] * expert(h)
        return out.reshape(shape)


class MoEModel(nn.Module):
    """Embedding, ``layers`` pre-norm residual MoE blocks, a norm and a head: a tiny MoE language model."""

    def __init__(self, vocab: int = 32, dim: int = 16, hidden: int = 8, layers: int = 2, experts: int = 4,
                 k: int = 2, style: str = "grouped"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        make = (lambda: ModuleListMoE(dim, hidden, experts, k)) if style == "modulelist" else \
            (lambda: FusedMoE(dim, hidden, experts, k, how=style))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.moes = nn.ModuleList(make() for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes):
            x = x + moe(norm(x))
        return self.head(self.norm(x))
