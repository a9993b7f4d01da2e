"""Hugging Face transformers models (BERT, GPT-2, ViT; random init, small configs) and the ops they brought.

The toy tests at the top pin down the rules added for ops these models use in their attention-mask
code (``&`` of boolean masks, advanced indexing with several index tensors, ``gather``,
``detach_``, ``diff``); they need no transformers. The model tests are skipped when transformers
is not installed.
"""
import pytest
import torch
from torch import nn

import autoperm
from rule_helpers import spec_and_error

TOL = 1e-5


# -- toy models for the added rules ---------------------------------------------------------------
class _MaskAnd(nn.Module):
    """A boolean mask built with ``&`` (aten.__and__) and an in-place detach_ on a hidden tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        keep = (x[..., :1] > 0) & (x[..., 1:2] > 0)
        t = h.clone()
        t.detach_()
        return self.b(h.masked_fill(keep, 0.0) + t)


class _MultiIndex(nn.Module):
    """h[i0, i1] with two index tensors: adjacent (result in place) or split by a slice (result in front)."""

    def __init__(self, adjacent: bool):
        super().__init__()
        self.adjacent = adjacent
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):  # x: (B, T, 4)
        h = torch.relu(self.a(x))  # (B, T, 8)
        i0 = torch.arange(h.shape[0]).unsqueeze(1).expand(-1, 2)  # (B, 2)
        i1 = torch.tensor([0, 2]).expand(h.shape[0], -1)
        if self.adjacent:
            return self.b(h[i0, i1])  # (B, 2, 8)
        return self.b(h.transpose(1, 2)[i0, :, i1])  # (B, 2, 8): indexed axes 0 and 2


class _Gather(nn.Module):
    """gather along the token axis with an index that is broadcast along the hidden axis."""

    def __init__(self, prefix: bool = False):
        super().__init__()
        self.prefix = prefix
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8 if not prefix else 4, 3)

    def forward(self, x):  # x: (B, T, 4)
        h = torch.relu(self.a(x))
        idx = torch.arange(h.shape[1]).flip(0)[None, :, None].expand(h.shape[0], -1, 4 if self.prefix else 8)
        return self.b(torch.gather(h, 1, idx))


class _Diff(nn.Module):
    """Differences of neighbouring tokens (aten.diff): the token axis is pinned, the hidden axis passes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(torch.diff(h, dim=1, prepend=h[:, :1]))


@pytest.mark.parametrize("model, shape", [
    (_MaskAnd(), (3, 4)), (_MultiIndex(True), (3, 5, 4)), (_MultiIndex(False), (3, 5, 4)),
    (_Gather(), (3, 5, 4)), (_Diff(), (3, 5, 4)),
], ids=["and-detach_", "index-adjacent", "index-split", "gather", "diff"])
def test_mask_ops_keep_the_hidden_group(model, shape):
    spec, err = spec_and_error(model, torch.randn(*shape))
    assert spec.unsupported == []
    assert list(spec.group_sizes.values()) == [8]
    assert {(m.key, m.axis) for m in spec.groups[0].members} == {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)}
    assert err < TOL


def test_gather_of_a_prefix_pins_the_axis():
    spec, err = spec_and_error(_Gather(prefix=True), torch.randn(3, 5, 4))
    assert spec.group_sizes == {}
    assert any("gather reads a prefix" in p.reason for p in spec.pinned if p.key == "a.weight" and p.axis == 0)
    assert err < TOL


class _ShapeOnly(nn.Module):
    """``h[:, :, -1]`` taken for its shape only (BART's positions): a value nothing reads neither pins nor couples."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.pos = nn.Linear(4, 8), nn.Linear(8, 3), nn.Embedding(16, 8)
        self.unread = nn.Parameter(torch.randn(8))

    def forward(self, x):  # x: (B, T, 4)
        h = torch.relu(self.a(x))
        last = h[:, :, -1] * self.unread[0]  # dead: only its shape is used
        return self.b(h + self.pos(torch.arange(last.shape[1])))


def test_a_value_nothing_reads_pins_nothing():
    spec, err = spec_and_error(_ShapeOnly(), torch.randn(3, 5, 4))
    assert spec.unsupported == []
    assert list(spec.group_sizes.values()) == [8]
    assert ("a.weight", 0) in {(m.key, m.axis) for m in spec.groups[0].members}
    assert any(p.key == "unread" and p.reason.startswith("not used by the traced graph") for p in spec.pinned)
    assert err < TOL


# -- transformers models --------------------------------------------------------------------------
try:
    import transformers
except ImportError:  # the toy tests above still run
    transformers = None
NO_TRANSFORMERS = "transformers is not installed (pip install transformers)"
needs_transformers = pytest.mark.skipif(transformers is None, reason=NO_TRANSFORMERS)

LAYERS, HEADS, HIDDEN = 2, 4, 32


class Logits(nn.Module):
    """Call a transformers model with keyword inputs and return its logits (one tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, attention_mask=None):
        if attention_mask is None:
            return self.model(x).logits
        return self.model(input_ids=x, attention_mask=attention_mask).logits


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=64, max_position_embeddings=32,
                                  num_labels=3)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0  # a padded sequence
    return Logits(transformers.BertForSequenceClassification(cfg)), (ids, mask)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32,
                                  use_cache=False, bos_token_id=0, eos_token_id=0)
    x = (torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    return Logits(transformers.GPT2LMHeadModel(cfg)), x


def vit():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=HIDDEN,
                                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
                                 num_labels=5)
    return Logits(transformers.ViTForImageClassification(cfg)), (torch.randn(2, 3, 32, 32),)


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit}


def _head_groups(spec):
    """Groups that move whole heads: the outer factor of a (heads x head dim) product."""
    heads = set()
    for exprs in spec.axes.values():
        for e in exprs:
            for part in ([e] if e and "prod" in e else e.get("cat", []) if e else []):
                if "prod" in part and "g" in part["prod"][0]:
                    heads.add(part["prod"][0]["g"])
    return heads


@pytest.fixture(scope="module", params=sorted(MODELS))
def hf(request):
    if transformers is None:
        pytest.skip(NO_TRANSFORMERS)
    torch.manual_seed(0)
    model, x = MODELS[request.param]()
    spec, err = spec_and_error(model.eval(), x)
    return request.param, model, x, spec, err


def test_invariance_with_attention_heads(hf):
    name, model, x, spec, err = hf
    assert err < TOL, name
    assert spec.unsupported == [], spec.unsupported
    heads = _head_groups(spec)
    assert len(heads) == LAYERS and all(spec.group_sizes[h] == HEADS for h in heads)
    sizes = sorted(spec.group_sizes.values())
    assert sizes.count(HIDDEN // HEADS) == 2 * LAYERS  # within-head: q/k and v/out share one each
    assert HIDDEN in sizes  # the residual stream


def test_pins_are_the_expected_ones(hf):
    name, model, x, spec, err = hf
    reasons = {p.reason.split(" at ")[0] for p in spec.pinned}
    allowed = {"embedding rows are addressed by ids", "model output", "model input", "convolution kernel axis",
               "spatial axis of a convolution", "not used by the traced graph"}
    assert reasons <= allowed, reasons - allowed


@pytest.mark.skipif(not hasattr(autoperm, "weight_matching"), reason="autoperm.weight_matching not available yet")
def test_weight_matching_recovers_a_planted_permutation(hf):
    name, model, x, spec, err = hf
    a = model.state_dict()
    b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=11), a)
    aligned = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, a, b), b)
    for k in spec.axes:
        assert torch.equal(aligned[k], a[k]), k


@pytest.mark.skipif(not hasattr(autoperm, "activation_matching"),
                    reason="autoperm.activation_matching not available yet")
def test_activation_matching_with_several_inputs(hf):
    """Batches of (input_ids, attention_mask) tuples reach the model as two inputs."""
    from autoperm.models import random_like
    from autoperm.plugins import align_states

    name, model, x, spec, err = hf
    a = model.state_dict()
    b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=12), a)
    inputs = [random_like(x, batch_size=16, seed=i) for i in range(2)]
    aligned, _ = align_states(spec, [a, b], "activation", model=model, inputs=inputs)
    for k in spec.axes:
        assert torch.equal(aligned[1][k], a[k]), k


@needs_transformers
def test_align_command_on_a_transformers_factory(tmp_path, monkeypatch):
    """The CLI path for a user model: a factory returning (model, example inputs)."""
    from autoperm.cli import main
    from autoperm.io import load_checkpoint, save_checkpoint

    (tmp_path / "hfmodels.py").write_text(
        "import torch, transformers\n"
        "from torch import nn\n"
        "class Logits(nn.Module):\n"
        "    def __init__(self, m):\n"
        "        super().__init__(); self.model = m\n"
        "    def forward(self, x):\n"
        "        return self.model(x).logits\n"
        "def gpt2():\n"
        "    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32,\n"
        "                                  use_cache=False, bos_token_id=0, eos_token_id=0)\n"
        "    torch.manual_seed(0)\n"
        "    return Logits(transformers.GPT2LMHeadModel(cfg)), (torch.randint(0, 100, (2, 8)),)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import hfmodels

    model, x = hfmodels.gpt2()
    autoperm.randomize_(model)
    spec = autoperm.infer_spec(model.eval(), x)
    perm = autoperm.random_permutation(spec, seed=1)
    a = model.state_dict()
    save_checkpoint(a, tmp_path / "a.safetensors")
    save_checkpoint(autoperm.apply_permutation(spec, perm, a), tmp_path / "b.safetensors")
    inv = autoperm.inverse_permutation(perm)
    monkeypatch.setattr(autoperm, "weight_matching", lambda *args, **k: inv, raising=False)
    assert main(["align", "--model", "hfmodels:gpt2", "a.safetensors", "b.safetensors", "-o", "c.safetensors",
                 "-q"]) == 0
    fresh, _ = hfmodels.gpt2()
    fresh.load_state_dict(load_checkpoint(tmp_path / "c.safetensors"), strict=True)
    for k, v in a.items():
        assert torch.equal(fresh.state_dict()[k], v), k
