"""Tiny transformers models for tests and for the CLI (``--model tiny_models:llama --model-arg dtype=bfloat16``).

Each factory returns ``(model, example_inputs)``: random weights perturbed by ``randomize_`` (so no
symmetry hides behind an init), eval mode, in ``dtype``; the inputs are token ids.
"""
import torch

import autoperm


def _finish(model, dtype: str, seed: int):
    autoperm.randomize_(model.eval(), seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model.to(getattr(torch, dtype)), (ids,)


def llama(dtype: str = "float32", seed: int = 0):
    """A 2-layer Llama (hidden 64, grouped-query attention: 4 heads, 2 key/value heads)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   use_cache=False)
    torch.manual_seed(seed)
    return _finish(transformers.LlamaForCausalLM(cfg), dtype, seed)


def bert(dtype: str = "float32", seed: int = 0):
    """A 2-layer BERT classifier (hidden 32, 4 heads, 3 labels). mergekit 0.1.5 merges this one; it
    fails on ``BertModel`` (an optional weight with aliases) and ``BertForMaskedLM`` (it asks for a pooler)."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(seed)
    return _finish(transformers.BertForSequenceClassification(cfg), dtype, seed)
