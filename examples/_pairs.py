"""Trained model pairs for matching experiments, cached under ``~/.cache/autoperm/pairs``.

Each pair is one architecture trained from two seeds on offline data:

- ``"llama"``: a 4-layer Llama (transformers ``LlamaForCausalLM``: RoPE, RMSNorm, SwiGLU, GQA with
  4 query heads on 2 key/value heads, width 128) as a character-level language model of the
  Python standard library's source (:func:`stdlib_corpus`);
- ``"mixtral"``: a 4-layer Mixtral (``MixtralForCausalLM``: 4 experts, top-2) on the same corpus;
- ``"vit"``: the tiny timm ViT of experiment 4 on MNIST-5k (40 epochs).

The two seeds of a pair differ in their initialisation and in their data order (seed ``s``
draws the batches of step ``t`` from ``Generator().manual_seed(s * 1_000_003 + t)``).
:func:`load_pair` trains what is missing (minutes, one thread) and otherwise loads the cache:

    from _pairs import load_pair            # run from examples/, or with examples/ on sys.path
    model_a, model_b, data = load_pair("llama")
    logits = model_a(data.val_inputs[:2])   # the language models take token ids [B, T]
    data.evaluate(model_a)                  # {"train_loss", "val_loss", "val_ppl"}

The language models are wrapped in :class:`Logits` (``model(ids)`` returns the logits tensor),
so their state-dict keys start with ``model.``; the cached files hold the unwrapped transformers
model's state dict. ``python examples/_pairs.py llama vit mixtral`` trains and reports them.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "autoperm", "pairs")
SEEDS = (1, 2)

# -- the corpus ----------------------------------------------------------------------------------
#: token ids: tab, newline, the 95 printable ASCII characters, and one id for every other byte
VOCAB = ["\t", "\n", *map(chr, range(32, 127)), "<other>"]
_LUT = torch.full((256,), len(VOCAB) - 1, dtype=torch.uint8)
_LUT[9], _LUT[10] = 0, 1
_LUT[32:127] = torch.arange(2, 97, dtype=torch.uint8)
_SKIP = {"site-packages", "dist-packages", "test", "tests"}


def stdlib_files() -> list[str]:
    """The standard library's ``.py`` files (tests and installed packages left out), sorted relative paths."""
    root = sysconfig.get_paths()["stdlib"]
    rel = (os.path.relpath(f, root) for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return sorted(r for r in rel if not _SKIP & set(r.split(os.sep)[:-1]))


def encode(data: bytes) -> torch.Tensor:
    """Bytes as token ids (uint8) of :data:`VOCAB`."""
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return _LUT[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()]


@dataclass
class CharCorpus:
    """Character-level text of the standard library's source, split by file (one in ten to validation).

    A file goes to validation when ``crc32(relative path) % 10 == 0``, so the split does not depend on
    which other files exist. ``train`` and ``val`` are the files' token ids, concatenated in path order.
    Evaluation uses fixed windows spread evenly over each split.
    """

    train: torch.Tensor
    val: torch.Tensor
    context: int = 128
    eval_windows: int = 128

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def windows(self, split: str, count: int) -> torch.Tensor:
        """``count`` windows of ``context + 1`` tokens at evenly spaced offsets of a split (int64)."""
        text = self.train if split == "train" else self.val
        starts = torch.linspace(0, len(text) - self.context - 2, count).long()
        return torch.stack([text[s:s + self.context + 1] for s in starts.tolist()]).long()

    def random_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """``batch_size`` training windows of ``context + 1`` tokens at random offsets."""
        starts = torch.randint(0, len(self.train) - self.context - 1, (batch_size,), generator=generator)
        return torch.stack([self.train[s:s + self.context + 1] for s in starts.tolist()]).long()

    @cached_property
    def val_inputs(self) -> torch.Tensor:
        return self.windows("val", self.eval_windows)[:, :-1]

    def input_batches(self, count: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
        """Fixed training inputs ``[batch_size, context]`` (for activation matching)."""
        w = self.windows("train", count * batch_size)[:, :-1]
        return list(w.split(batch_size))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 64) -> dict:
        """Mean next-token cross-entropy on the fixed train and validation windows, and validation perplexity."""
        was = model.training
        model.eval()
        out = {}
        for split in ("train", "val"):
            w = self.windows(split, self.eval_windows)
            tot = sum(float(lm_loss(model(c[:, :-1]), c[:, 1:])) * len(c) for c in w.split(batch_size))
            out[f"{split}_loss"] = tot / len(w)
        out["val_ppl"] = math.exp(out["val_loss"])
        model.train(was)
        return out


def stdlib_corpus(context: int = 128) -> CharCorpus:
    """The corpus of :class:`CharCorpus` (about 12 MB of text on CPython 3.11; deterministic)."""
    root = sysconfig.get_paths()["stdlib"]
    parts = {"train": [], "val": []}
    for rel in stdlib_files():
        with open(os.path.join(root, rel), "rb") as f:
            parts["val" if zlib.crc32(rel.encode()) % 10 == 0 else "train"].append(encode(f.read()))
    return CharCorpus(torch.cat(parts["train"]), torch.cat(parts["val"]), context)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# -- the models ----------------------------------------------------------------------------------
class Logits(nn.Module):
    """A transformers causal LM as ``ids -> logits`` (what tracing and matching want)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits


_COMMON = dict(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, use_cache=False, tie_word_embeddings=False)


def llama() -> nn.Module:
    import transformers
    return Logits(transformers.LlamaForCausalLM(transformers.LlamaConfig(**_COMMON, intermediate_size=344)))


def mixtral() -> nn.Module:
    import transformers
    cfg = transformers.MixtralConfig(**_COMMON, intermediate_size=192, num_local_experts=4, num_experts_per_tok=2)
    return Logits(transformers.MixtralForCausalLM(cfg))


def vit() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                             num_classes=10, embed_dim=64, depth=3, num_heads=4)


#: the language models' training settings (seeds differ in initialisation and data order)
LM_TRAINING = {"llama": dict(steps=600, batch_size=32, lr=3e-3, warmup=50),
               "mixtral": dict(steps=360, batch_size=32, lr=3e-3, warmup=30)}


def train_lm(model: Logits, corpus: CharCorpus, seed: int, *, steps: int, batch_size: int, lr: float,
             warmup: int, log_every: int = 100) -> dict:
    """AdamW (weight decay 0.1 on matrices), linear warm-up then cosine decay to 10 %, gradient clip 1."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, t / steps)))))
    model.train()
    t0 = time.time()
    for t in range(steps):
        w = corpus.random_batch(batch_size, torch.Generator().manual_seed(seed * 1_000_003 + t))
        loss = lm_loss(model(w[:, :-1]), w[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (t % log_every == 0 or t == steps - 1):
            print(f"  step {t}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    return {"seconds": time.time() - t0, **corpus.evaluate(model)}


def _file(name: str, seed: int) -> str:
    return os.path.join(CACHE, {"llama": "llama_rope_gqa", "mixtral": "mixtral_e4top2", "vit": "vit_exp4_e40"}[name]
                        + f"_s{seed}.pt")


def _trained(name: str, seed: int, data) -> nn.Module:
    torch.manual_seed(seed)
    model = {"llama": llama, "mixtral": mixtral, "vit": vit}[name]()
    path = _file(name, seed)
    inner = model.model if isinstance(model, Logits) else model
    if os.path.exists(path):
        inner.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    if name == "vit":
        from _common import train
        train(model, data, epochs=40, lr=1e-3, batch_size=128, seed=seed)  # logs its accuracies
    else:
        stats = train_lm(model, data, seed, **LM_TRAINING[name])
        print(f"  {name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(inner.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model.eval()


def load_pair(name: str):
    """``(model_a, model_b, data)`` of pair ``name`` (``"llama"``, ``"mixtral"`` or ``"vit"``), in eval mode.

    ``data`` is a :class:`CharCorpus` for the language models and ``autoperm.data.mnist5k(image=True)``
    for the ViT. Missing models are trained (and cached) first.
    """
    if name == "vit":
        from autoperm.data import mnist5k
        data = mnist5k(image=True)
    elif name in LM_TRAINING:
        data = stdlib_corpus()
    else:
        raise ValueError(f"unknown pair {name!r}; pairs: llama, mixtral, vit")
    a, b = (_trained(name, s, data) for s in SEEDS)
    return a, b, data


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for pair in sys.argv[1:] or ["llama", "vit", "mixtral"]:
        t0 = time.time()
        a, b, d = load_pair(pair)
        from autoperm.barrier import evaluator
        evaluate = d.evaluate if isinstance(d, CharCorpus) else evaluator(d)
        print(pair, [{k: round(v, 4) for k, v in evaluate(m).items()} for m in (a, b)], flush=True)
        print(f"{pair}: {time.time() - t0:.0f} s", flush=True)
