"""Checkpoints: formats, wrappers, validation messages, atomic writes that never replace an input."""
import json
import os

import pytest
import torch
from torch import nn

import autoperm
from autoperm.io import (
    CheckpointError, load_checkpoint, permutation_from_dict, permutation_to_dict, save_checkpoint, unwrap_state_dict,
    write_text,
)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip_each_format(tmp_path, suffix):
    sd = _net().state_dict()
    path = tmp_path / f"m{suffix}"
    save_checkpoint(sd, path)
    _same(load_checkpoint(path, reference=sd), sd)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("wrap", [
    lambda sd: {"state_dict": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
    lambda sd: {"model": sd, "step": 10},
    lambda sd: {"model": {"state_dict": sd}},
    lambda sd: {"model_state_dict": sd},
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
    lambda sd: {"state_dict": {"model." + k: v for k, v in sd.items()}},  # Lightning
], ids=["state_dict", "model", "nested", "model_state_dict", "ddp", "ddp+compile", "lightning"])
def test_training_checkpoint_wrappers_are_unwrapped(tmp_path, wrap):
    net = _net()
    sd = net.state_dict()
    torch.save(wrap(sd), tmp_path / "ckpt.pt")
    got = load_checkpoint(tmp_path / "ckpt.pt", reference=sd)
    _same(got, sd)
    net.load_state_dict(got, strict=True)


def test_prefix_kept_when_the_model_has_it(tmp_path):
    sd = {"model.w": torch.zeros(2)}
    torch.save(sd, tmp_path / "x.pt")
    assert list(load_checkpoint(tmp_path / "x.pt", reference=sd)) == ["model.w"]


def test_mismatch_errors_name_the_keys(tmp_path):
    sd = _net().state_dict()
    bad = dict(sd)
    del bad["1.running_mean"]
    bad["3.weight"] = torch.zeros(5, 8)
    bad["extra.bias"] = torch.zeros(2)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "bad.pt", reference=sd)
    msg = str(e.value)
    assert "bad.pt" in msg
    assert "1 missing key (1.running_mean)" in msg
    assert "1 unexpected key (extra.bias)" in msg
    assert "3.weight: (5, 8) in the checkpoint, (3, 8) in the model" in msg


def test_long_key_lists_are_shortened():
    ref = {f"k{i}": torch.zeros(1) for i in range(20)}
    with pytest.raises(CheckpointError, match=r"20 missing keys \(k0, k1, .*and 12 more\)"):
        autoperm.io.validate_state_dict({"other": torch.zeros(1)}, ref)


def test_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a state dict: 2 entries are not tensors"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save([torch.zeros(1)], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "l.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="empty state dict"):
        unwrap_state_dict({})


def test_refuses_to_overwrite_an_input(tmp_path):
    sd = _net().state_dict()
    src = tmp_path / "a.pt"
    save_checkpoint(sd, src)
    before = src.read_bytes()
    other = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="it is an input"):
        save_checkpoint(other, src, inputs=[src])
    os.symlink(src, tmp_path / "link.pt")
    with pytest.raises(CheckpointError, match="it is an input"):
        save_checkpoint(other, tmp_path / "link.pt", inputs=[src])
    os.link(src, tmp_path / "hard.pt")
    with pytest.raises(CheckpointError, match="it is an input"):
        save_checkpoint(other, tmp_path / "hard.pt", inputs=[src])
    with pytest.raises(CheckpointError, match="it is an input"):
        write_text(src, "x", inputs=[str(src)])
    assert src.read_bytes() == before
    with pytest.raises(CheckpointError, match="it exists"):
        save_checkpoint(other, src, overwrite=False)


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    sd = _net().state_dict()
    dst = tmp_path / "out.pt"
    dst.write_bytes(b"old")

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(sd, dst)
    assert dst.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.pt"]


def test_missing_folder_and_non_tensor_values(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint({"w": torch.zeros(1)}, tmp_path / "no" / "out.pt")
    with pytest.raises(CheckpointError, match="1 entry not tensors"):
        save_checkpoint({"w": torch.zeros(1), "epoch": 3}, tmp_path / "out.pt")


def test_safetensors_with_tied_and_non_contiguous_tensors(tmp_path):
    w = torch.randn(4, 6)
    sd = {"emb.weight": w, "head.weight": w, "t": torch.randn(6, 4).t(), "view": w[1:3]}
    save_checkpoint(sd, tmp_path / "tied.safetensors", metadata={"method": "weight"})
    got = load_checkpoint(tmp_path / "tied.safetensors")
    for k in sd:
        assert torch.equal(got[k], sd[k])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert f.metadata()["method"] == "weight"


def test_written_files_get_the_usual_mode(tmp_path):
    save_checkpoint({"w": torch.zeros(1)}, tmp_path / "m.pt")
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "m.pt").st_mode & 0o777 == 0o666 & ~mask


def test_permutation_json_round_trip():
    spec = autoperm.infer_spec(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(1, 3))
    perm = autoperm.random_permutation(spec, seed=4)
    back = permutation_from_dict(json.loads(json.dumps(permutation_to_dict(perm))))
    assert all(torch.equal(back[k], perm[k]) for k in perm)
    with pytest.raises(ValueError, match="not an autoperm permutation"):
        permutation_from_dict({"groups": {}})


def _doc_blocks(name, lang):
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", name), encoding="utf-8").read()
    return [b.split("\n", 1)[1] for b in text.split("```" + lang)[1:] for b in [b.split("```")[0]]]


def test_spec_format_doc_example_and_reference_implementation():
    """docs/spec-format.md: the example spec loads, its gather indices are as the table says, and the
    NumPy reference implementation agrees with apply_permutation."""
    np = pytest.importorskip("numpy")
    example = next(b for b in _doc_blocks("spec-format.md", "json") if '"mix.weight"' in b)
    d = json.loads(example)
    spec = autoperm.PermutationSpec.from_json(example)
    assert spec.to_dict() == d  # round trip, field for field
    perm = {"fc1.weight:0": torch.tensor([3, 1, 0, 2]), "proj.weight:0.0": torch.tensor([1, 0]),
            "proj.weight:0.1": torch.tensor([2, 0, 1])}
    from autoperm.permutation import axis_index

    assert axis_index(spec.axes["proj.weight"][0], perm).tolist() == [5, 3, 4, 2, 0, 1]
    assert axis_index(spec.axes["mix.weight"][1], perm).tolist() == [0, 1, 7, 5, 6, 4, 2, 3]
    state = {k: torch.randn(*s) if s else torch.tensor(7) for k, s in d["shapes"].items()}
    ns = {}
    exec(_doc_blocks("spec-format.md", "python")[0], ns)  # the reference implementation
    plain_perm = {k: v.tolist() for k, v in perm.items()}
    theirs = ns["apply_permutation"](d, plain_perm, {k: v.numpy() for k, v in state.items()})
    ours = autoperm.apply_permutation(spec, perm, state)
    for k in state:
        assert np.array_equal(theirs[k], ours[k].numpy()), k


def test_a_wrapped_model_reads_a_bare_checkpoint(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = _net()

    bare = _net().state_dict()
    save_checkpoint(bare, tmp_path / "bare.safetensors")
    w = Wrapper()
    w.load_state_dict(load_checkpoint(tmp_path / "bare.safetensors", reference=w.state_dict()), strict=True)
    torch.save({"module." + k: v for k, v in w.state_dict().items()}, tmp_path / "ddp.pt")
    assert list(load_checkpoint(tmp_path / "ddp.pt", reference=w.state_dict())) == list(w.state_dict())
