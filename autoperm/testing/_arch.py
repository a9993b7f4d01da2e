"""A generator of random architectures: small ``nn.Module``s that mix every op autoperm has a rule for.

An architecture is drawn by a :class:`Chooser` (a seeded ``random.Random`` or a hypothesis
``draw``), so the same seed always gives the same model. The model runs a list of blocks over a
*stream*, a tensor of one of four kinds:

========  ================  ==============
kind      shape             channel axis
========  ================  ==============
``vec``   (B, C)            1
``seq``   (B, T, C)         -1
``img``   (B, C, H, W)      1
``sig``   (B, C, L)         1
========  ================  ==============

Blocks keep or change the kind (pooling, flatten, patch tokens with a class token and position
embedding, reshaping a vector into tokens). Every block is a module ``forward(x, env)``; ``env``
carries the extra inputs, streams saved for later skip connections and extra outputs.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Chooser", "RandomChooser", "Architecture", "generate", "random_architecture", "BLOCKS"]

GENERATOR_VERSION = "2"  # bump when a seed starts to mean another architecture

_ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu, "sigmoid": torch.sigmoid}


class Chooser:
    """Where the random choices come from: ``integer(lo, hi)`` (inclusive), ``pick(seq)``, ``flag(p)``."""

    def integer(self, lo: int, hi: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def pick(self, options):
        return options[self.integer(0, len(options) - 1)]

    def flag(self, p: float = 0.5) -> bool:
        return self.integer(0, 999) < int(p * 1000)


class RandomChooser(Chooser):
    """Choices from ``random.Random(seed)``: one seed, one architecture."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


# ---------------------------------------------------------------------------------------------
# the stream


@dataclass(frozen=True)
class Stream:
    """A stream's kind, channel count and other non-batch sizes (T for seq, H, W for img, L for sig)."""

    kind: str
    c: int
    spatial: tuple = ()

    @property
    def shape(self) -> tuple:
        return (self.spatial[0], self.c) if self.kind == "seq" else (self.c, *self.spatial)

    @property
    def ch(self) -> int:
        return -1 if self.kind == "seq" else 1

    def with_c(self, c: int) -> "Stream":
        return Stream(self.kind, c, self.spatial)


def _proj(s: Stream, cin: int, cout: int, ch: Chooser, *, k: int = 1, groups: int = 1) -> nn.Module:
    """A channel map for the stream's kind: Linear (vec, seq), Conv2d (img), Conv1d (sig)."""
    bias = ch.flag(0.8)
    if s.kind in ("vec", "seq"):
        return nn.Linear(cin, cout, bias=bias)
    conv = nn.Conv2d if s.kind == "img" else nn.Conv1d
    return conv(cin, cout, k, padding=k // 2, groups=groups, bias=bias)


def _divisors(n: int, lo: int = 2) -> list[int]:
    return [d for d in range(lo, n + 1) if n % d == 0]


def _expand_channel(s: Stream, v: torch.Tensor) -> torch.Tensor:
    """A (B, C) tensor shaped to broadcast against the stream on its channel axis."""
    if s.kind == "img":
        return v[:, :, None, None]
    if s.kind == "sig":
        return v[:, :, None]
    if s.kind == "seq":
        return v[:, None, :]
    return v


def _channel_mean(s: Stream, x: torch.Tensor) -> torch.Tensor:
    """(B, C): the stream averaged over every non-channel, non-batch axis."""
    if s.kind == "img":
        return x.mean((2, 3))
    if s.kind == "sig":
        return x.mean(2)
    if s.kind == "seq":
        return x.mean(1)
    return x


class Block(nn.Module):
    """A step of the architecture: ``forward(x, env) -> x``; ``label`` describes it."""

    label = "block"

    def forward(self, x, env):  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Built:
    """What a block generator returns: the block, the stream after it, and what to expect of the spec."""

    block: Block
    out: Stream
    permuted: list = field(default_factory=list)  # (local key, axis) that must carry a group
    train_check: bool = False  # has BatchNorm-like statistics: check in train mode too


# ---------------------------------------------------------------------------------------------
# blocks


class Dense(Block):
    """proj -> act -> proj (an MLP, or conv -> act -> conv: plain, grouped, depthwise, transposed)."""

    def __init__(self, fc1, fc2, act, label):
        super().__init__()
        self.fc1, self.fc2, self.act, self.label = fc1, fc2, act, label

    def forward(self, x, env):
        return self.fc2(_ACTS[self.act](self.fc1(x)))


def gen_dense(s: Stream, ch: Chooser, cout: int | None = None) -> Built:
    cout = cout if cout is not None else ch.integer(2, 8)
    hidden = ch.integer(2, 8)
    act = ch.pick(list(_ACTS))
    variant = "plain" if s.kind in ("vec", "seq") else ch.pick(["plain", "plain", "grouped", "depthwise", "transposed"])
    permuted = [("fc1.weight", 0)]
    if variant == "grouped" and _divisors(math.gcd(s.c, cout)):
        g = ch.pick(_divisors(math.gcd(s.c, cout)))
        hidden = g * ch.integer(1, 3)
        fc1 = _proj(s, s.c, hidden, ch, k=ch.pick([1, 3]), groups=g)
        fc2 = _proj(s, hidden, cout, ch, k=1, groups=g)
        if hidden == g:
            permuted = []  # one channel per group: only the blocks move, and they follow the stream
    elif variant == "depthwise":
        m = ch.integer(1, 3)
        hidden = s.c * m
        fc1 = _proj(s, s.c, hidden, ch, k=3, groups=s.c)
        fc2 = _proj(s, hidden, cout, ch)
        permuted = [("fc1.weight", 0)] if m > 1 else []
    elif variant == "transposed" and all(n >= 1 for n in s.spatial):
        conv_t = nn.ConvTranspose2d if s.kind == "img" else nn.ConvTranspose1d
        conv = nn.Conv2d if s.kind == "img" else nn.Conv1d
        g = ch.pick([1] + _divisors(math.gcd(s.c, hidden)))
        fc1 = conv_t(s.c, hidden, 2, stride=2, groups=g, bias=ch.flag())
        fc2 = conv(hidden, cout, 2, stride=2, bias=ch.flag())
        permuted = [("fc1.weight", 1)]  # ConvTranspose weights are (in, out / groups, k...)
        if g == hidden:
            permuted = []
    else:
        variant = "plain"
        fc1 = _proj(s, s.c, hidden, ch, k=ch.pick([1, 3]))
        fc2 = _proj(s, hidden, cout, ch, k=ch.pick([1, 3]))
    return Built(Dense(fc1, fc2, act, f"dense[{variant} {s.c}->{hidden}->{cout} {act}]"), s.with_c(cout), permuted)


class Norm(Block):
    """One normalization layer on the stream's channel axis (moved where the layer wants it)."""

    def __init__(self, kind: str, layer: nn.Module, stream_kind: str):
        super().__init__()
        self.kind, self.layer, self.stream_kind = kind, layer, stream_kind
        self.label = f"norm[{kind}]"

    def forward(self, x, env):
        sk = self.stream_kind
        if self.kind in ("layer", "rms") and sk in ("img", "sig"):
            return self.layer(x.movedim(1, -1)).movedim(-1, 1)  # channels-last and back
        if self.kind in ("batch", "group", "instance") and sk == "seq":
            return self.layer(x.transpose(1, 2)).transpose(1, 2)
        return self.layer(x)


def gen_norm(s: Stream, ch: Chooser) -> Built:
    options = ["batch", "layer", "rms"]
    if s.kind in ("img", "sig", "seq"):
        options += ["group"] + (["instance"] if math.prod(s.spatial) > 1 else [])
    kind = ch.pick(options)
    affine = ch.flag(0.8)
    c = s.c
    if kind == "batch":
        layer = (nn.BatchNorm2d if s.kind == "img" else nn.BatchNorm1d)(c, affine=affine)
    elif kind == "layer":
        layer = nn.LayerNorm(c, elementwise_affine=affine, bias=ch.flag())
    elif kind == "rms":
        layer = nn.RMSNorm(c, elementwise_affine=affine)
    elif kind == "group":
        layer = nn.GroupNorm(ch.pick([1] + _divisors(c)), c, affine=affine)
    else:
        layer = (nn.InstanceNorm2d if s.kind == "img" else nn.InstanceNorm1d)(
            c, affine=affine, track_running_stats=ch.flag(0.3))
    # InstanceNorm1d on (B, C) would read C as the length: only multi-axis kinds get it (see options)
    return Built(Norm(kind, layer, s.kind), s, [], train_check=kind in ("batch", "instance"))


class Residual(Block):
    """x + f1(x) + f2(x) + ...: several branches added into one stream (optionally pre-normed)."""

    def __init__(self, branches, norm, label):
        super().__init__()
        self.branches, self.norm, self.label = nn.ModuleList(branches), norm, label

    def forward(self, x, env):
        h = self.norm(x, env) if self.norm is not None else x
        out = x
        for b in self.branches:
            out = out + b(h, env)
        return out


def gen_residual(s: Stream, ch: Chooser, depth: int) -> Built:
    norm = gen_norm(s, ch) if ch.flag(0.5) else None
    branches, permuted, train = [], [], norm is not None and norm.train_check
    labels = []
    for i in range(ch.integer(1, 3)):
        b = _gen_branch(s, ch, depth)
        branches.append(b.block)
        permuted += [(f"branches.{i}.{k}", a) for k, a in b.permuted]
        train |= b.train_check
        labels.append(b.block.label)
    label = f"residual[{'pre-' + norm.block.label + ' ' if norm else ''}{' + '.join(labels)}]"
    return Built(Residual(branches, norm.block if norm else None, label), s, permuted, train)


def _gen_branch(s: Stream, ch: Chooser, depth: int) -> Built:
    """A width-preserving block for a residual branch."""
    options = ["dense", "dense", "gate", "scale"]
    if s.kind == "seq":
        options += ["attention", "attention", "heads"]
    if depth < 2:
        options += ["chain"]
    kind = ch.pick(options)
    if kind == "dense":
        return gen_dense(s, ch, s.c)
    if kind == "gate":
        return gen_gate(s, ch)
    if kind == "scale":
        inner = gen_dense(s, ch, s.c)
        sc = LayerScale(inner.block, s, ch.flag(0.2))
        return Built(sc, s, [(f"inner.{k}", a) for k, a in inner.permuted])
    if kind == "attention":
        return gen_attention(s, ch)
    if kind == "heads":
        return gen_heads(s, ch)
    return gen_chain(s, ch, depth + 1, ch.integer(1, 2), keep_width=True)


class LayerScale(Block):
    """inner(x) * gamma (layer scale), or a scalar gain when ``scalar``."""

    def __init__(self, inner, s: Stream, scalar: bool):
        super().__init__()
        self.inner = inner
        shape = (1,) if scalar else ((s.c,) if s.kind in ("vec", "seq") else (s.c,) + (1,) * len(s.spatial))
        self.gamma = nn.Parameter(torch.full(shape, 0.1))
        self.label = f"layerscale[{inner.label}{' scalar' if scalar else ''}]"

    def forward(self, x, env):
        return self.inner(x, env) * self.gamma


class Gate(Block):
    """Squeeze-excite: x * sigmoid(fc2(relu(fc1(mean(x))))) (channel gating)."""

    def __init__(self, fc1, fc2, s: Stream):
        super().__init__()
        self.fc1, self.fc2, self.s = fc1, fc2, s
        self.label = f"gate[se {s.c}->{fc1.out_features}]"

    def forward(self, x, env):
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(_channel_mean(self.s, x)))))
        return x * _expand_channel(self.s, g)


def gen_gate(s: Stream, ch: Chooser) -> Built:
    r = ch.integer(2, 6)
    return Built(Gate(nn.Linear(s.c, r), nn.Linear(r, s.c), s), s, [("fc1.weight", 0)])


class MoE(Block):
    """A mixture-of-experts layer routed by top-k: fused experts (grouped, gather or scatter) or a ModuleList."""

    def __init__(self, moe, label):
        super().__init__()
        self.moe, self.label = moe, label

    def forward(self, x, env):
        return self.moe(x)


def gen_moe(s: Stream, ch: Chooser) -> Built:
    from ._moe import FusedMoE, ModuleListMoE

    experts, hidden = ch.integer(2, 4), ch.integer(2, 6)
    k = ch.integer(1, min(2, experts))
    style = ch.pick(["grouped", "gather", "scatter", "modulelist"])
    if style == "modulelist":
        moe = ModuleListMoE(s.c, hidden, experts, k)
        permuted = [("moe.experts.0.gate.weight", 0), ("moe.router.weight", 0)]  # experts move as modules
    else:
        moe = FusedMoE(s.c, hidden, experts, k, how=style, router_bias=ch.flag())
        permuted = [("moe.gate_up_proj", 0), ("moe.down_proj", 2)]
    moe.router = nn.Linear(s.c, experts)  # a bias keeps top-k free of ties on all-zero tokens
    return Built(MoE(moe, f"moe[{style} e{experts} k{k} h{hidden}]"), s, permuted)


class Attention(Block):
    """Multi-head attention over tokens: fused or separate q/k/v, sdpa or explicit softmax(q kᵀ) v."""

    def __init__(self, c, heads, dqk, dv, fused, sdpa, bias):
        super().__init__()
        self.h, self.dqk, self.dv, self.fused, self.sdpa = heads, dqk, dv, fused, sdpa
        if fused:
            self.qkv = nn.Linear(c, heads * dqk * 3, bias=bias)
        else:
            self.q, self.k = nn.Linear(c, heads * dqk, bias=bias), nn.Linear(c, heads * dqk, bias=bias)
            self.v = nn.Linear(c, heads * dv, bias=bias)
        self.proj = nn.Linear(heads * dv, c)
        self.label = (f"attention[{'fused' if fused else 'separate'} {'sdpa' if sdpa else 'explicit'} "
                      f"heads={heads} dqk={dqk} dv={dv}]")

    def forward(self, x, env):
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv(x).reshape(b, t, 3, self.h, self.dqk).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(x).reshape(b, t, self.h, self.dqk).transpose(1, 2)
            k = self.k(x).reshape(b, t, self.h, self.dqk).transpose(1, 2)
            v = self.v(x).reshape(b, t, self.h, self.dv).transpose(1, 2)
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            a = (q @ k.transpose(-2, -1)) * self.dqk ** -0.5
            o = a.softmax(dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, t, self.h * self.dv))


def gen_attention(s: Stream, ch: Chooser) -> Built:
    heads, dqk = ch.integer(1, 3), ch.integer(1, 4)
    fused = ch.flag()
    dv = dqk if fused else ch.integer(1, 4)
    att = Attention(s.c, heads, dqk, dv, fused, ch.flag(), ch.flag(0.8))
    permuted = [("proj.weight", 1)] if heads * dv > 1 else []
    return Built(att, s, permuted)


class Heads(Block):
    """Reshape to heads and back: (B, T, H*D) -> (B, T, H, D) -> per-head op -> (B, T, H*D)."""

    def __init__(self, fc1, fc2, heads, op):
        super().__init__()
        self.fc1, self.fc2, self.h, self.op = fc1, fc2, heads, op
        self.label = f"heads[{heads}x{fc1.out_features // heads} {op}]"

    def forward(self, x, env):
        b, t, _ = x.shape
        y = self.fc1(x).view(b, t, self.h, -1)
        if self.op == "softmax":
            y = y.softmax(-1)
        elif self.op == "norm":
            y = F.layer_norm(y, y.shape[-1:])
        else:
            y = y.transpose(2, 3).relu().transpose(2, 3)
        return self.fc2(y.reshape(b, t, -1))


def gen_heads(s: Stream, ch: Chooser) -> Built:
    heads, d = ch.integer(1, 3), ch.integer(2, 3)
    return Built(Heads(nn.Linear(s.c, heads * d), nn.Linear(heads * d, s.c), heads, ch.pick(["softmax", "norm", "t"])),
                 s, [("fc1.weight", 0)])


class Chain(Block):
    """Blocks in sequence."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.label = "(" + " ; ".join(b.label for b in blocks) + ")"

    def forward(self, x, env):
        for b in self.blocks:
            x = b(x, env)
        return x


def gen_chain(s: Stream, ch: Chooser, depth: int, n: int, keep_width: bool = False) -> Built:
    blocks, permuted, train, cur = [], [], False, s
    for i in range(n):
        last = i == n - 1
        b = gen_block(cur, ch, depth, cout=s.c if keep_width and last else None, same_kind=keep_width)
        blocks.append(b.block)
        permuted += [(f"blocks.{i}.{k}", a) for k, a in b.permuted]
        train |= b.train_check
        cur = b.out
    if keep_width and cur != s:  # the last block changed the stream: map it back
        b = gen_dense(cur, ch, s.c)
        blocks.append(b.block)
        cur = b.out
    return Built(Chain(blocks), cur, permuted, train)


class ConcatSplit(Block):
    """cat([f1(x), f2(x), ...]) on channels, act, split into other sizes, map and add (or cat again)."""

    def __init__(self, fs, split, gs, mode, s: Stream):
        super().__init__()
        self.fs, self.gs, self.split, self.mode, self.s = nn.ModuleList(fs), nn.ModuleList(gs), split, mode, s
        self.label = (f"concat-split[{[f.out_features if hasattr(f, 'out_features') else f.out_channels for f in fs]}"
                      f" -> {split} {mode}]")

    def forward(self, x, env):
        y = F.gelu(torch.cat([f(x) for f in self.fs], dim=self.s.ch))
        parts = torch.split(y, self.split, dim=self.s.ch)
        if self.mode == "chunk-swap":
            parts = list(reversed(parts))
            return torch.cat([g(p) for g, p in zip(self.gs, parts)], dim=self.s.ch)
        out = self.gs[0](parts[0])
        for g, p in zip(self.gs[1:], parts[1:]):
            out = out + g(p)
        return out


def gen_concat_split(s: Stream, ch: Chooser) -> Built:
    widths = [ch.integer(1, 5) for _ in range(ch.integer(2, 3))]
    total = sum(widths)
    cuts = sorted(set(ch.integer(1, total - 1) for _ in range(ch.integer(1, 2))))
    split = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    mode = ch.pick(["add", "chunk-swap"])
    fs = [_proj(s, s.c, w, ch) for w in widths]
    if mode == "add":
        cout = ch.integer(2, 8)
        gs = [_proj(s, w, cout, ch) for w in split]
    else:
        outs = [ch.integer(1, 4) for _ in split]
        cout = sum(outs)
        gs = [_proj(s, w, o, ch) for w, o in zip(reversed(split), outs)]
    return Built(ConcatSplit(fs, split, gs, mode, s), s.with_c(cout), [])


class Slice(Block):
    """A slice of the stream: leading channels, a channel stride, dropping a token or a row."""

    def __init__(self, how, s: Stream, k: int):
        super().__init__()
        self.how, self.s, self.k = how, s, k
        self.label = f"slice[{how} {k}]"

    def forward(self, x, env):
        if self.how == "channels":
            return x[..., : self.k] if self.s.kind == "seq" else x[:, : self.k]
        if self.how == "channel-stride":
            return x[..., :: self.k] if self.s.kind == "seq" else x[:, :: self.k]
        if self.how == "narrow":
            return x.narrow(self.s.ch, self.k, x.shape[self.s.ch] - self.k)
        if self.how == "token":
            return x[:, self.k:]
        return x[..., self.k:]  # trailing spatial axis


def gen_slice(s: Stream, ch: Chooser) -> Built:
    options = ["channels", "channel-stride", "narrow"] if s.c >= 3 else []
    if s.kind == "seq" and s.spatial[0] >= 2:
        options.append("token")
    if s.kind in ("img", "sig") and s.spatial[-1] >= 2:
        options.append("spatial")
    if not options:
        return gen_dense(s, ch)
    how = ch.pick(options)
    if how == "channels":
        k = ch.integer(2, s.c - 1)
        return Built(Slice(how, s, k), s.with_c(k))
    if how == "channel-stride":
        k = 2
        return Built(Slice(how, s, k), s.with_c(len(range(0, s.c, k))))
    if how == "narrow":
        k = ch.integer(1, s.c - 2)
        return Built(Slice(how, s, k), s.with_c(s.c - k))
    if how == "token":
        return Built(Slice(how, s, 1), Stream("seq", s.c, (s.spatial[0] - 1,)))
    return Built(Slice(how, s, 1), Stream(s.kind, s.c, s.spatial[:-1] + (s.spatial[-1] - 1,)))


class Pool(Block):
    """Spatial pooling (avg, max, adaptive) that keeps the kind."""

    def __init__(self, how, s: Stream, size):
        super().__init__()
        self.how, self.s, self.size = how, s, size
        self.label = f"pool[{how}]"

    def forward(self, x, env):
        two = self.s.kind == "img"
        if self.how == "avg":
            return (F.avg_pool2d if two else F.avg_pool1d)(x, 2)
        if self.how == "max":
            return (F.max_pool2d if two else F.max_pool1d)(x, 2)
        return (F.adaptive_avg_pool2d if two else F.adaptive_avg_pool1d)(x, self.size)


def gen_pool(s: Stream, ch: Chooser) -> Built:
    if s.kind not in ("img", "sig") or min(s.spatial) < 2:
        return gen_norm(s, ch)
    how = ch.pick(["avg", "max", "adaptive"])
    sp = tuple(n // 2 for n in s.spatial) if how != "adaptive" else tuple(ch.integer(1, n) for n in s.spatial)
    return Built(Pool(how, s, sp if s.kind == "img" else sp[0]), Stream(s.kind, s.c, sp))


class Pad(Block):
    """Constant padding of the spatial axes, or of the channel axis (adds fixed channels)."""

    def __init__(self, pads, label):
        super().__init__()
        self.pads, self.label = pads, label

    def forward(self, x, env):
        return F.pad(x, self.pads, value=0.5)


def gen_pad(s: Stream, ch: Chooser) -> Built:
    if s.kind in ("img", "sig") and ch.flag():
        p = ch.integer(1, 2)
        return Built(Pad((p, p) * len(s.spatial), f"pad[spatial {p}]"), Stream(s.kind, s.c, tuple(n + 2 * p for n in s.spatial)))
    before, after = ch.integer(0, 2), ch.integer(1, 2)
    trailing = {"vec": 0, "seq": 0, "img": 2, "sig": 1}[s.kind]
    return Built(Pad((0, 0) * trailing + (before, after), f"pad[channels {before}+{after}]"), s.with_c(s.c + before + after))


class Twice(Block):
    """One module called twice: f(act(f(x)))."""

    def __init__(self, f, act):
        super().__init__()
        self.f, self.act = f, act
        self.label = f"twice[{act}]"

    def forward(self, x, env):
        return self.f(_ACTS[self.act](self.f(x)))


class Tied(Block):
    """Two modules sharing one weight tensor: out(act(a(x)) + act(b(x))) with b.weight is a.weight."""

    def __init__(self, a, b, out):
        super().__init__()
        self.a, self.b, self.out = a, b, out
        self.b.weight = self.a.weight
        self.label = f"tied[{a.weight.shape[0]}]"

    def forward(self, x, env):
        return self.out(F.relu(self.a(x)) + torch.tanh(self.b(x)))


def gen_shared(s: Stream, ch: Chooser) -> Built:
    if ch.flag():
        return Built(Twice(_proj(s, s.c, s.c, ch), ch.pick(list(_ACTS))), s, [])
    h, cout = ch.integer(2, 6), ch.integer(2, 6)
    a, b = _proj(s, s.c, h, ch), _proj(s, s.c, h, ch)
    return Built(Tied(a, b, _proj(s, h, cout, ch)), s.with_c(cout), [("a.weight", 0)])


class Unsupported(Block):
    """An op that does not commute with channel permutations (cumsum, sort, cummax, flip), or an LSTM.

    The LSTM has had a rule since the generator was written (its input features couple to W_ih);
    it stays here so that seeds keep drawing the same architectures."""

    def __init__(self, how, s: Stream, cout: int):
        super().__init__()
        self.how, self.s = how, s
        if how == "lstm":
            self.lstm = nn.LSTM(s.c, cout, batch_first=True)
        self.label = f"unsupported[{how}]"

    def forward(self, x, env):
        d = self.s.ch
        if self.how == "cumsum":
            return torch.cumsum(x, dim=d)
        if self.how == "sort":
            return torch.sort(x, dim=d).values
        if self.how == "cummax":
            return torch.cummax(x, dim=d).values
        if self.how == "flip":
            return torch.flip(x, dims=(d,))
        return self.lstm(x)[0]


def gen_unsupported(s: Stream, ch: Chooser) -> Built:
    how = ch.pick(["cumsum", "sort", "cummax", "flip"] + (["lstm", "lstm"] if s.kind == "seq" else []))
    cout = ch.integer(2, 6) if how == "lstm" else s.c
    return Built(Unsupported(how, s, cout), s.with_c(cout))


class SkipSave(Block):
    """Remember the stream under ``slot`` for a later skip connection."""

    def __init__(self, slot):
        super().__init__()
        self.slot, self.label = slot, f"save[{slot}]"

    def forward(self, x, env):
        env["saved"][self.slot] = x
        return x


class SkipAdd(Block):
    """Add a stream saved earlier (a long skip connection), optionally through a map."""

    def __init__(self, slot, f):
        super().__init__()
        self.slot, self.f, self.label = slot, f, f"skip-add[{slot}{' mapped' if f is not None else ''}]"

    def forward(self, x, env):
        y = env["saved"][self.slot]
        return x + (self.f(y) if self.f is not None else y)


class CondAdd(Block):
    """Add a projection of the second model input (B, E), broadcast over the stream."""

    def __init__(self, f, s: Stream):
        super().__init__()
        self.f, self.s, self.label = f, s, "cond-add"

    def forward(self, x, env):
        return x + _expand_channel(self.s, self.f(env["inputs"][1]))


class AuxOut(Block):
    """An extra model output: a head on the current stream (or the stream itself)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.label = f, f"aux-out[{'head' if f is not None else 'raw'}]"

    def forward(self, x, env):
        env["outs"].append(self.f(x) if self.f is not None else x)
        return x


class Convert(Block):
    """A change of kind: global pool or flatten to vec, patch tokens (+ class token, position embedding),
    tokens to vec (mean or class token), vec to tokens (reshape), sig <-> seq (transpose)."""

    def __init__(self, how, s: Stream, out: Stream, cls: bool = False, pos: bool = False):
        super().__init__()
        self.how, self.s = how, s
        if cls:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, s.c))
        if pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, out.spatial[0], s.c))
        self.cls, self.pos = cls, pos
        self.out_t = out.spatial[0] if out.kind == "seq" else None
        self.label = f"convert[{s.kind}->{out.kind} {how}{' cls' if cls else ''}{' pos' if pos else ''}]"

    def forward(self, x, env):
        if self.how == "gap":
            return _channel_mean(self.s, x)
        if self.how == "flatten":
            return x.flatten(1)
        if self.how == "first":
            return x[:, 0]
        if self.how == "patches":
            x = x.flatten(2).transpose(1, 2)
            if self.cls:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            return x + self.pos_embed if self.pos else x
        if self.how == "to-tokens":
            return x.reshape(x.shape[0], self.out_t, -1)
        return x.transpose(1, 2)  # sig <-> seq


def gen_convert(s: Stream, ch: Chooser) -> Built:
    if s.kind == "vec":
        ds = [d for d in _divisors(s.c) if d < s.c]
        if not ds:
            return gen_dense(s, ch)
        t = ch.pick(ds)
        out = Stream("seq", s.c // t, (t,))
        return Built(Convert("to-tokens", s, out), out)
    if s.kind == "img":
        how = ch.pick(["gap", "flatten", "patches", "patches"])
        if how == "flatten" and s.c * math.prod(s.spatial) > 64:
            how = "gap"
        if how == "patches":
            cls = ch.flag()
            t = math.prod(s.spatial) + int(cls)
            out = Stream("seq", s.c, (t,))
            return Built(Convert(how, s, out, cls=cls, pos=ch.flag(0.7)), out)
        out = Stream("vec", s.c if how == "gap" else s.c * math.prod(s.spatial))
        return Built(Convert(how, s, out), out)
    if s.kind == "sig":
        how = ch.pick(["gap", "flatten", "seq"])
        if how == "flatten" and s.c * s.spatial[0] > 64:
            how = "gap"
        if how == "seq":
            return Built(Convert(how, s, Stream("seq", s.c, s.spatial)), Stream("seq", s.c, s.spatial))
        out = Stream("vec", s.c if how == "gap" else s.c * s.spatial[0])
        return Built(Convert(how, s, out), out)
    how = ch.pick(["gap", "first", "sig"])
    if how == "sig":
        return Built(Convert(how, s, Stream("sig", s.c, s.spatial)), Stream("sig", s.c, s.spatial))
    return Built(Convert(how, s, Stream("vec", s.c)), Stream("vec", s.c))


BLOCKS: dict[str, Callable] = {
    "dense": lambda s, ch, d: gen_dense(s, ch),
    "norm": lambda s, ch, d: gen_norm(s, ch),
    "residual": lambda s, ch, d: gen_residual(s, ch, d),
    "concat-split": lambda s, ch, d: gen_concat_split(s, ch),
    "slice": lambda s, ch, d: gen_slice(s, ch),
    "attention": lambda s, ch, d: gen_attention(s, ch),
    "heads": lambda s, ch, d: gen_heads(s, ch),
    "gate": lambda s, ch, d: gen_gate(s, ch),
    "pool": lambda s, ch, d: gen_pool(s, ch),
    "pad": lambda s, ch, d: gen_pad(s, ch),
    "shared": lambda s, ch, d: gen_shared(s, ch),
    "unsupported": lambda s, ch, d: gen_unsupported(s, ch),
    "convert": lambda s, ch, d: gen_convert(s, ch),
    "moe": lambda s, ch, d: gen_moe(s, ch),
}
WEIGHTS = {"dense": 3, "norm": 3, "residual": 4, "concat-split": 2, "slice": 2, "attention": 4, "heads": 2, "gate": 2,
           "pool": 2, "pad": 2, "shared": 2, "unsupported": 1, "convert": 3, "moe": 2}


def _applicable(name: str, s: Stream) -> bool:
    if name in ("attention", "heads"):
        return s.kind == "seq"
    if name == "moe":
        return s.kind in ("vec", "seq")
    if name == "pool":
        return s.kind in ("img", "sig") and min(s.spatial) >= 2
    if name == "slice":
        return s.c >= 3 or (s.kind != "vec" and s.spatial[-1] >= 2)
    if name == "convert":
        return s.kind != "vec" or any(d < s.c for d in _divisors(s.c))
    return True


def _weighted(ch: Chooser, weights: dict) -> str:
    r = ch.integer(0, sum(weights.values()) - 1)
    for name, w in weights.items():
        if r < w:
            return name
        r -= w
    raise AssertionError


def gen_block(s: Stream, ch: Chooser, depth: int, cout: int | None = None, same_kind: bool = False) -> Built:
    """One random block on stream ``s`` (weighted by ``WEIGHTS``); with ``cout`` a dense block of that width."""
    if cout is not None:
        return gen_dense(s, ch, cout)
    names = {n: w for n, w in WEIGHTS.items() if _applicable(n, s)
             and not (same_kind and n in ("convert", "pool", "slice", "pad"))
             and not (depth > 1 and n == "residual")}
    return BLOCKS[_weighted(ch, names)](s, ch, depth)


# ---------------------------------------------------------------------------------------------
# the whole model


class FuzzNet(nn.Module):
    """A generated architecture: ``blocks`` over the stream, then ``head``; extra outputs from AuxOut."""

    def __init__(self, blocks, head, labels):
        super().__init__()
        self.blocks, self.head, self.labels = nn.ModuleList(blocks), head, labels

    def forward(self, *inputs):
        env = {"inputs": inputs, "saved": {}, "outs": []}
        x = inputs[0]
        for b in self.blocks:
            x = b(x, env)
        y = self.head(x) if self.head is not None else x
        return (y, *env["outs"]) if env["outs"] else y

    def extra_repr(self) -> str:
        return " -> ".join(self.labels)


@dataclass
class Architecture:
    """A generated model (float64), its example inputs and what its spec must show."""

    seed: int | None
    model: nn.Module
    inputs: tuple
    labels: list[str]
    permuted: list  # (state-dict key, axis) that must carry a permutation group
    train_check: bool

    @property
    def description(self) -> str:
        kinds = " ".join(f"{tuple(t.shape)}" for t in self.inputs)
        return f"seed={self.seed} inputs={kinds}: " + " -> ".join(self.labels)


_START = {
    "vec": lambda ch: Stream("vec", ch.integer(2, 8)),
    "seq": lambda ch: Stream("seq", ch.integer(2, 8), (ch.integer(1, 5),)),
    "img": lambda ch: Stream("img", ch.integer(1, 4), (ch.integer(2, 6), ch.integer(2, 6))),
    "sig": lambda ch: Stream("sig", ch.integer(1, 4), (ch.integer(2, 8),)),
}


def generate(ch: Chooser, seed: int | None = None, max_blocks: int = 6) -> Architecture:
    """Draw one architecture from ``ch`` (see the module docstring)."""
    init_seed = ch.integer(0, 2**31 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return _generate(ch, seed, max_blocks)


def _generate(ch: Chooser, seed, max_blocks) -> Architecture:
    start = _START[_weighted(ch, {"vec": 2, "seq": 3, "img": 3, "sig": 2})](ch)
    batch = 3
    inputs = [torch.randn(batch, *start.shape)]
    cond = ch.integer(2, 5) if ch.flag(0.25) else None
    if cond:
        inputs.append(torch.randn(batch, cond))
    blocks, labels, permuted, train = [], [], [], False

    def add(built: Built):
        nonlocal train
        i = len(blocks)
        blocks.append(built.block)
        labels.append(built.block.label)
        permuted.extend((f"blocks.{i}.{k}", a) for k, a in built.permuted)
        train |= built.train_check
        return built.out

    s = start
    if ch.flag(0.85):  # a stem: the first hidden width
        if ch.flag(0.3):
            s = add(gen_dense(s, ch))
        else:
            c = ch.integer(2, 8)
            s = add(Built(_Stem(_proj(s, s.c, c, ch, k=ch.pick([1, 3]))), s.with_c(c)))
    # every architecture has at least one plain hidden layer, so its spec cannot be empty
    n = ch.integer(1, max_blocks)
    must = ch.integer(0, n - 1)
    slots: dict[str, Stream] = {}
    for i in range(n):
        if i == must:
            s = add(gen_dense(s, ch))
            continue
        step = _weighted(ch, {"block": 76, "save": 8, "skip": 6 if slots else 0, "cond": 5 if cond else 0, "aux": 5})
        if step == "save":
            slot = f"s{len(slots)}"
            slots[slot] = s
            s = add(Built(SkipSave(slot), s))
        elif step == "skip":
            slot = ch.pick(sorted(slots))
            src = slots[slot]
            if src == s:
                s = add(Built(SkipAdd(slot, None), s))
            elif src.kind == s.kind and src.spatial == s.spatial:
                s = add(Built(SkipAdd(slot, _proj(s, src.c, s.c, ch)), s))
            else:
                s = add(gen_norm(s, ch))
        elif step == "cond":
            s = add(Built(CondAdd(nn.Linear(cond, s.c), s), s))
        elif step == "aux":
            s = add(Built(AuxOut(_proj(s, s.c, ch.integer(1, 4), ch) if ch.flag(0.7) else None), s))
        else:
            s = add(gen_block(s, ch, 0))
    head = _proj(s, s.c, ch.integer(1, 4), ch) if ch.flag(0.8) else None
    model = FuzzNet(blocks, head, labels).double()
    return Architecture(seed, model, tuple(t.double() for t in inputs), labels, permuted, train)


class _Stem(Block):
    def __init__(self, f):
        super().__init__()
        self.f = f
        self.label = f"stem[{type(f).__name__}]"

    def forward(self, x, env):
        return self.f(x)


def random_architecture(seed: int, max_blocks: int = 6) -> Architecture:
    """The architecture of ``seed`` (deterministic: one seed, one model)."""
    return generate(RandomChooser(seed), seed=seed, max_blocks=max_blocks)
