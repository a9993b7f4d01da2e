"""torch.distributed: 2 and 3 gloo ranks on the CPU find what one process finds, and fail loudly.

Each scenario runs in fresh processes (``dist_helpers.launch``) joined within a deadline; every
collective is bounded by the process group's timeout.
"""
import pytest
import torch

import autoperm
from autoperm import distributed
from dist_helpers import MODELS, launch


def _ok(results):
    for r, res in enumerate(results):
        assert res is not None, f"rank {r} wrote no result"
        assert "ok" in res, f"rank {r}: {res.get('error')}: {res.get('message')}"
    return [res["ok"] for res in results]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_find_what_one_process_finds(world):
    ranks = _ok(launch(world, "match"))
    alone = ranks[0]["alone"]
    for name in MODELS:
        ref = alone[name]
        assert any(not torch.equal(p, torch.arange(len(p))) for p in ref["weight"].values())
        for r, out in enumerate(ranks):
            got = out[name]
            for matcher in ("activation", "weight"):  # exactly the same permutation
                assert set(got[matcher]) == set(ref[matcher])
                for g, p in ref[matcher].items():
                    assert torch.equal(got[matcher][g], p), (name, r, matcher, g)
            for k, v in ref["bn"].items():  # BatchNorm reset: float32 statistics, within round-off
                torch.testing.assert_close(got["bn"][k], v, rtol=1e-5, atol=1e-6)
            for side in (0, 1):  # REPAIR statistics: float64 sums
                for layer, (mean, std) in ref["repair"][side].items():
                    torch.testing.assert_close(got["repair"][side][layer][0], mean, rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(got["repair"][side][layer][1], std, rtol=1e-12, atol=1e-12)
            assert set(got["curve"]) == set(ref["curve"])
            for metric, values in ref["curve"].items():
                assert abs(got["curve"][metric] - values).max() < 1e-5, (name, r, metric)
            if r:  # every rank holds the same curve
                assert all((got["curve"][m] == ranks[0][name]["curve"][m]).all() for m in got["curve"])
    for out in ranks:  # weight matching, each rank reading its own safetensors shards of a folder
        assert all(torch.equal(out["folder"][g], p) for g, p in alone["resnet"]["weight"].items())
    for out in ranks:  # a rank with no batch adds nothing
        perm, stats = out["idle"]
        ref_perm, ref_stats = alone["idle"]
        assert all(torch.equal(perm[g], p) for g, p in ref_perm.items())
        for layer, (mean, std) in ref_stats.items():
            torch.testing.assert_close(stats[layer][0], mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(stats[layer][1], std, rtol=1e-12, atol=1e-12)
    for out in ranks:  # straight-through matching: gradients averaged over the ranks
        assert all(torch.equal(out["ste"][g], p) for g, p in alone["ste"].items())
    for out in ranks:  # then rank 1 held a wider model, then other weights: every rank raised
        assert out["mismatch"]["spec"].startswith("the ranks do not hold the same model"), out["mismatch"]
        assert "rank 1: spec" in out["mismatch"]["spec"]
        assert "rank 1: state_a values" in out["mismatch"]["weights"]
        assert "rank 2" not in out["mismatch"]["weights"]
        assert out["mismatch"]["missing"] == "no rank holds '2.bias'"


def test_a_rank_that_dies_is_an_error_on_the_others():
    results = launch(3, "rank_dies", deadline=90, timeout=8)
    assert results[2] is None  # it exited without a word
    for res in results[:2]:
        assert res is not None and res.get("error") == "DistributedError", res
        assert "another rank died" in res["message"]


def test_a_rank_that_never_arrives_is_an_error_within_the_timeout():
    results = launch(2, "rank_hangs", deadline=90, timeout=5)
    assert results[0] is not None and results[0].get("error") == "DistributedError", results[0]
    assert "timeout" in results[0]["message"]




def test_alone_the_helpers_do_nothing():
    t = torch.ones(3)
    distributed.all_reduce_(t)
    assert t.tolist() == [1.0, 1.0, 1.0]
    assert distributed.reduce_sum([2.0, 3.0]) == [2.0, 3.0]
    assert distributed.rank() == 0 and distributed.world_size() == 1
    perm = {"g": torch.tensor([1, 0])}
    assert torch.equal(distributed.broadcast_permutation(perm)["g"], perm["g"])
    distributed.check_same(None, spec=None, state=perm)
    distributed.barrier()


def test_a_group_without_torch_distributed_is_a_clear_error():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    spec = autoperm.infer_spec(mlp, torch.randn(1, 4))
    with pytest.raises(ValueError, match="not initialised"):
        autoperm.activation_matching(spec, mlp, mlp, [torch.randn(4, 4)], process_group=object())
