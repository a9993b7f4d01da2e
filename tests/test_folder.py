"""Transformers folders larger than memory: meta-device specs, lazy reads, streaming matching and writes."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import autoperm
from autoperm.matching._blocks import shared_view

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from safetensors.torch import load_file, save_file  # noqa: E402

from autoperm.cli import main  # noqa: E402
from autoperm.folder import (  # noqa: E402
    LazyState, WeightFiles, open_folder, stream_weight_matching, write_permuted_folder,
)
from autoperm.io import permutation_from_dict  # noqa: E402


def _llama(seed: int, tie: bool = True) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, use_cache=False)
    torch.manual_seed(seed)
    return autoperm.randomize_(transformers.LlamaForCausalLM(cfg)).to(torch.bfloat16).eval()


def _save(model, path, **kw):
    model.save_pretrained(path, max_shard_size="12KB", **kw)  # several shards and an index
    (path / "tokenizer_config.json").write_text("{}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A (sharded bf16, tied embeddings), B = A with a planted permutation (written by streaming), and C,
    an independently initialised model of the same config."""
    root = tmp_path_factory.mktemp("folders")
    _save(_llama(0), root / "a")
    _save(_llama(1), root / "c")
    fm = open_folder(str(root / "a"))
    spec = fm.spec()
    perm = autoperm.random_permutation(spec, seed=5)  # independent rows per key/value head
    write_permuted_folder(str(root / "a"), str(root / "b"), spec, perm)
    return root, spec, perm


def _tensors(folder) -> dict:
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


def test_the_source_is_sharded_bf16_with_tied_embeddings(folders):
    root, spec, _ = folders
    files = WeightFiles(str(root / "a"))
    assert len(files.files) > 2 and os.path.isfile(root / "a" / "model.safetensors.index.json")
    assert {i.dtype for i in files.infos.values()} == {torch.bfloat16}
    assert "lm_head.weight" in spec.axes and "lm_head.weight" not in files.infos
    state = open_folder(str(root / "a")).state()
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]


def test_streaming_write_keeps_the_layout_and_permutes_every_tensor(folders):
    root, spec, perm = folders
    assert sorted(os.listdir(root / "b")) == sorted(os.listdir(root / "a") + ["autoperm_permutation.json"])
    for name in os.listdir(root / "a"):
        if not name.endswith(".safetensors"):
            assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()  # index, config, tokenizer
    a, b = _tensors(root / "a"), _tensors(root / "b")
    want = autoperm.apply_permutation(spec, perm, {**a, "lm_head.weight": a["model.embed_tokens.weight"]})
    assert set(b) == set(a) and all(torch.equal(b[k], want[k]) for k in b)
    assert load_file(str(root / "b" / sorted(WeightFiles(str(root / "a")).files)[0])) is not None


@pytest.mark.parametrize("slab_bytes, cache", [(1 << 28, 1 << 14), (256, 1 << 14), (256, 1024)],
                         ids=["whole", "slabs", "rows-from-files"])
def test_streaming_matching_equals_in_memory_matching(folders, slab_bytes, cache):
    """Same permutation as weight_matching, whether products are whole, in slabs of cached tensors, or in
    slabs of rows read from the files (tensors larger than the cache)."""
    root, spec, _ = folders
    a, c = open_folder(str(root / "a")).state(cache), open_folder(str(root / "c")).state(cache)
    # the same descent: over the shared-inner view (the block steps that follow differ, see the docstring)
    sv = shared_view(spec)
    in_memory = autoperm.weight_matching(sv, dict(a), dict(c))
    streamed = stream_weight_matching(sv, a, c, slab_bytes=slab_bytes)
    assert spec.per and all(torch.equal(in_memory[g], streamed[g]) for g in spec.group_sizes)
    assert a.reads > len(a.files.infos)  # the small cache made it read tensors again, on demand


def test_align_folders_recovers_the_planted_permutation(folders, tmp_path, capsys):
    root, spec, perm = folders
    out = tmp_path / "aligned"
    argv = ["align", str(root / "a"), str(root / "b"), "-o", str(out), "--perm-out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    found = permutation_from_dict(json.loads((tmp_path / "p.json").read_text()))
    inv = autoperm.inverse_permutation(perm)
    assert all(torch.equal(found[g], inv[g]) for g in inv)
    a, aligned = _tensors(root / "a"), _tensors(out)
    assert all(torch.equal(a[k], aligned[k]) for k in a)  # B aligned to A is A, bit for bit (bf16)
    assert "relative output difference" in capsys.readouterr().err  # checked by running both models


def test_inspect_a_folder_reads_no_weights(folders, monkeypatch, capsys):
    root, spec, _ = folders
    monkeypatch.setattr(WeightFiles, "read", lambda *a: pytest.fail("inspect read a tensor"))
    assert main(["inspect", str(root / "a"), "-q"]) == 0
    assert f"{len(spec.group_sizes)} groups" in capsys.readouterr().out


def test_an_interrupted_write_leaves_nothing_in_place_and_resumes(folders, tmp_path):
    root, spec, perm = folders
    out, seen = tmp_path / "out", []

    def crash(shard, key):
        seen.append(shard)
        if len(set(seen)) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_permuted_folder(str(root / "a"), str(out), spec, perm, on_tensor=crash)
    assert not out.exists()
    partial = tmp_path / ".out.autoperm-partial"
    assert partial.is_dir()  # hidden, beside the destination: the first shard is finished there
    first = sorted(WeightFiles(str(root / "a")).files)[0]
    assert (partial / first).is_file()
    written = []
    write_permuted_folder(str(root / "a"), str(out), spec, perm, on_tensor=lambda s, k: written.append(s))
    assert first not in written  # resumed after the finished shard
    assert not partial.exists() and sorted(os.listdir(out)) == sorted(os.listdir(root / "b"))
    b, new = _tensors(root / "b"), _tensors(out)
    assert all(torch.equal(b[k], new[k]) for k in b)


def test_an_interrupted_write_with_another_permutation_starts_clean(folders, tmp_path):
    root, spec, perm = folders

    def crash(shard, key):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_permuted_folder(str(root / "a"), str(tmp_path / "out"), spec, autoperm.identity_permutation(spec),
                              on_tensor=crash)
    write_permuted_folder(str(root / "a"), str(tmp_path / "out"), spec, perm)
    b, new = _tensors(root / "b"), _tensors(tmp_path / "out")
    assert all(torch.equal(b[k], new[k]) for k in b)
    assert os.listdir(tmp_path) == ["out"]


def _broken_copy(folders, tmp_path, name):
    root = folders[0]
    shutil.copytree(root / "b", tmp_path / name)
    return tmp_path / name, sorted(WeightFiles(str(root / "b")).files)


def test_a_missing_shard_is_named_and_nothing_is_written(folders, tmp_path, capsys):
    broken, shards = _broken_copy(folders, tmp_path, "broken")
    os.unlink(broken / shards[1])
    assert main(["align", str(folders[0] / "a"), str(broken), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken / shards[1]) in err and "missing" in err
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_a_shape_mismatch_names_the_file_and_key(folders, tmp_path, capsys):
    broken, shards = _broken_copy(folders, tmp_path, "broken")
    tensors = load_file(str(broken / shards[0]))
    key = next(iter(tensors))
    tensors[key] = torch.zeros(3, 5, dtype=torch.bfloat16)
    save_file(tensors, str(broken / shards[0]))
    assert main(["align", str(folders[0] / "a"), str(broken), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken / shards[0]) in err and key in err and "(3, 5)" in err
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_a_nan_weight_is_one_line_naming_the_file_and_key(folders, tmp_path, capsys):
    broken, shards = _broken_copy(folders, tmp_path, "broken")
    tensors = load_file(str(broken / shards[-1]))
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(broken / shards[-1]), metadata={"format": "pt"})
    assert main(["align", str(folders[0] / "a"), str(broken), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(broken) in err and key in err and "NaN" in err
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_a_bin_folder_is_aligned_too(folders, tmp_path):
    """Without safetensors: pytorch_model.bin (read with torch.load(mmap=True)), written back as .bin."""
    root, spec, perm = folders
    (tmp_path / "b_bin").mkdir()
    shutil.copy(root / "b" / "config.json", tmp_path / "b_bin" / "config.json")
    torch.save(_tensors(root / "b"), tmp_path / "b_bin" / "pytorch_model.bin")
    assert main(["align", str(root / "a"), str(tmp_path / "b_bin"), "-o", str(tmp_path / "out"), "-q"]) == 0
    a = _tensors(root / "a")
    out = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert set(out) == set(a) and all(torch.equal(a[k], out[k]) for k in a)


def test_lazy_state_cache_is_bounded(folders):
    root = folders[0]
    files = WeightFiles(str(root / "a"))
    biggest = max(i.nbytes for i in files.infos.values())
    state = LazyState(files, cache_bytes=biggest)
    for k in files.infos:
        state[k]
    assert state._held <= biggest and state.reads == len(files.infos)


def test_mergekit_prepass_streams_folders(folders, tmp_path):
    yaml = pytest.importorskip("yaml")
    from autoperm.plugins.mergekit import prepare_config

    root = folders[0]
    cfg = {"models": [{"model": str(root / "a")}, {"model": str(root / "b")}], "merge_method": "linear"}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    path = prepare_config(str(tmp_path / "m.yml"), str(tmp_path / "out"))
    new = yaml.safe_load(open(path))["models"][1]["model"]
    assert os.path.isfile(os.path.join(new, "model.safetensors.index.json"))
    a, aligned = _tensors(root / "a"), _tensors(new)
    assert all(torch.equal(a[k], aligned[k]) for k in a)


def test_cli_errors_are_one_line_for_checkpoints_too(tmp_path, capsys):
    """A NaN weight in a checkpoint file (not a folder): one line naming the file and key, no traceback."""
    timm = pytest.importorskip("timm")
    good = timm.create_model("test_resnet", pretrained=False, num_classes=4).state_dict()
    bad = {k: v.clone() for k, v in good.items()}
    key = next(k for k, v in good.items() if v.dim() == 4)
    bad[key][0, 0, 0, 0] = float("nan")
    save_file(good, str(tmp_path / "a.safetensors"))
    save_file(bad, str(tmp_path / "b.safetensors"))
    rc = main(["align", "--model", "test_resnet", "--model-arg", "num_classes=4", "--input-shape", "3,64,64", "-q",
               str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(tmp_path / "b.safetensors") in err and key in err and "NaN" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_align_interrupted_mid_write_then_rerun(folders, tmp_path, monkeypatch):
    """`autoperm align` stopped in the middle of writing: nothing in place; the same command again finishes it."""
    import autoperm.folder.write as write

    root = folders[0]
    argv = ["align", str(root / "a"), str(root / "b"), "-o", str(tmp_path / "out"), "-q"]
    real = write._write_safetensors
    calls = []

    def once_then_stop(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the process were stopped during the second shard
        return real(*args, **kw)

    monkeypatch.setattr(write, "_write_safetensors", once_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(write, "_write_safetensors", real)
    assert main(argv) == 0
    a, out = _tensors(root / "a"), _tensors(tmp_path / "out")
    assert all(torch.equal(a[k], out[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_mergekit_prepass_names_a_missing_shard_and_writes_nothing(folders, tmp_path):
    yaml = pytest.importorskip("yaml")
    from autoperm.io import CheckpointError
    from autoperm.plugins.mergekit import prepare_config

    broken, shards = _broken_copy(folders, tmp_path, "broken")
    os.unlink(broken / shards[0])
    cfg = {"models": [{"model": str(folders[0] / "a")}, {"model": str(broken)}], "merge_method": "linear"}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=shards[0]):
        prepare_config(str(tmp_path / "m.yml"), str(tmp_path / "out"))
    assert not os.listdir(tmp_path / "out")


def test_inspect_check_and_barrier_on_folders(folders, capsys):
    root = folders[0]
    assert main(["inspect", str(root / "a"), "--check", "-q"]) == 0
    assert "invariance check" in capsys.readouterr().out
    assert main(["barrier", str(root / "a"), str(root / "b"), "--data", "digits", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "folders" in err
