"""Launching gloo process groups on the CPU for ``test_distributed.py``, and what each rank runs.

``launch(world, scenario)`` starts ``world`` processes (multiprocessing, spawn) that join one gloo
group through a file store, run ``SCENARIOS[scenario](rank, world)`` and save its result (or the
error it raised) to ``rank{r}.pt``; every process is joined within a deadline and killed past it.
"""
from __future__ import annotations

import copy
import datetime
import functools
import multiprocessing
import os
import sys
import tempfile
import time

import torch
from torch import nn

from rule_helpers import FusedAttentionNet

_TIMEOUT = 20.0  # seconds: the process group's timeout, bounding every collective


# -- models ----------------------------------------------------------------------------------------
class ResNetBN(nn.Module):
    """A stem, one residual block with BatchNorm, a strided conv and a linear head."""

    def __init__(self, width=8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.down, self.bn3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(x + self.bn2(self.c2(torch.relu(self.bn1(self.c1(x))))))
        x = torch.relu(self.bn3(self.down(x)))
        return self.head(x.mean((2, 3)))


def _mlp(width=32):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


MODELS = {"mlp": (_mlp, (8,)), "resnet": (ResNetBN, (3, 8, 8)), "transformer": (functools.partial(FusedAttentionNet, classes=4), (5, 6))}


def setup(name, n_batches=6, batch=16, **kw):
    """Two independently initialised models, their spec and labelled batches (the same on every rank)."""
    key = (name, n_batches, batch, tuple(sorted(kw.items())))
    if key not in _SETUPS:
        _SETUPS[key] = _setup(name, n_batches, batch, **kw)
    return _SETUPS[key]


_SETUPS: dict = {}


def _setup(name, n_batches, batch, **kw):
    import autoperm
    make, shape = MODELS[name]
    torch.manual_seed(0)
    a = make(**kw)
    torch.manual_seed(1)
    b = make(**kw)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 4, (batch,), generator=g))
               for _ in range(n_batches)]
    for m in (a, b):  # BatchNorm statistics of the data, not the initial ones
        autoperm.reset_bn_stats(m, batches)
    spec = autoperm.infer_spec(a, batches[0][0][:2])
    return spec, a, b, batches


# -- what the ranks run ----------------------------------------------------------------------------
def _pipeline(name, group):
    """Every data-parallel statistic and matcher on ``name``; alone when ``group`` is None."""
    import autoperm
    from autoperm import distributed
    from autoperm.barrier import Repair, evaluator, interpolation_curve

    spec, a, b, batches = setup(name)
    mine = list(distributed.shard(batches, group))
    out = {}
    out["activation"] = autoperm.activation_matching(spec, a, b, mine, progress=False, process_group=group)
    state_a, state_b = a.state_dict(), b.state_dict()
    r, n = distributed.rank(group), distributed.world_size(group)
    keys = [k for k in state_a if list(state_a).index(k) % n == r]  # this rank's shard of the keys
    out["weight"] = autoperm.weight_matching(spec, {k: state_a[k] for k in keys}, {k: state_b[k] for k in keys},
                                             progress=False, process_group=group)
    aligned = autoperm.apply_permutation(spec, out["weight"], state_b)
    bn = autoperm.reset_bn_stats(copy.deepcopy(b), mine, process_group=group)
    out["bn"] = {k: v for k, v in bn.state_dict().items() if "running" in k or "num_batches" in k}
    rep = Repair(a, state_a, aligned, mine, process_group=group)
    out["repair"] = (rep.stats_a, rep.stats_b)
    x, y = torch.cat([x for x, _ in mine]), torch.cat([y for _, y in mine])
    evaluate = evaluator((x, y), process_group=group)
    curve = interpolation_curve(a, state_a, aligned, evaluate, [0.0, 0.5, 1.0], process_group=group,
                                reset_bn=mine if autoperm.barrier.has_batchnorm(a) else None, repair=mine)
    out["curve"] = curve.metrics
    return out


def match(rank, world, timeout):
    """The distributed results on every rank; rank 0 adds the single-process ones (``alone``); then
    the errors of ranks holding different models (``mismatch``)."""
    import torch.distributed as dist
    out = {name: _pipeline(name, dist.group.WORLD) for name in MODELS}
    if rank == 0:
        out["alone"] = {name: _pipeline(name, None) for name in MODELS}
    out["ste"] = ste(dist.group.WORLD)
    out["folder"] = folder_weight(dist.group.WORLD)
    out["idle"] = idle_rank(rank, world, dist.group.WORLD)
    if rank == 0:  # one process on the batches of the busy ranks
        spec, a, b, batches = setup("mlp")
        busy = [x for i, x in enumerate(batches) if i % world != world - 1]
        out["alone"]["idle"] = idle_rank(0, 1, None, busy)
    if rank == 0:  # one process, each step on the ranks' batches of that step together
        batches = setup("mlp")[3]
        out["alone"]["ste"] = ste(None, [tuple(torch.cat(t) for t in zip(*batches[i:i + world]))
                                         for i in range(0, len(batches), world)])
    out["mismatch"] = mismatch(rank, world, timeout)
    return out


def folder_weight(group):
    """Weight matching of the ResNets from a folder of 3 safetensors shards per model, each rank
    reading its own shard files (every rank writes the folder in a directory of its own)."""
    import autoperm
    from autoperm import distributed
    from safetensors.torch import load_file, save_file
    spec, a, b, _ = setup("resnet")
    with tempfile.TemporaryDirectory() as folder:
        for name, model in (("a", a), ("b", b)):
            state = model.state_dict()
            for i in range(3):
                save_file({k: state[k].contiguous() for k in list(state)[i::3]}, f"{folder}/{name}-{i}.safetensors")
        mine = list(distributed.shard(range(3), group))
        state_a = {k: v for i in mine for k, v in load_file(f"{folder}/a-{i}.safetensors").items()}
        state_b = {k: v for i in mine for k, v in load_file(f"{folder}/b-{i}.safetensors").items()}
    return autoperm.weight_matching(spec, state_a, state_b, progress=False, process_group=group)


def idle_rank(rank, world, group, batches=None):
    """Activation matching and REPAIR statistics of the MLPs with the last rank holding no batch."""
    import autoperm
    from autoperm import distributed
    from autoperm.barrier import Repair
    spec, a, b, all_batches = setup("mlp")
    mine = list(distributed.shard(all_batches, group)) if batches is None else batches
    mine = [] if world > 1 and rank == world - 1 else mine
    perm = autoperm.activation_matching(spec, a, b, mine, progress=False, process_group=group)
    rep = Repair(a, a.state_dict(), b.state_dict(), mine, modules=["0", "2"], process_group=group)
    return perm, rep.stats_a


def ste(group, batches=None):
    """Straight-through matching of the MLPs, 4 steps."""
    import autoperm
    from autoperm import distributed
    spec, a, b, all_batches = setup("mlp")
    mine = list(distributed.shard(all_batches, group)) if batches is None else batches
    return autoperm.ste_matching(spec, a, b, mine, nn.functional.cross_entropy, steps=4, lr=0.05,
                                 process_group=group, progress=False)


def rank_dies(rank, world, timeout):
    """The last rank exits before the first collective; the others start activation matching."""
    import autoperm
    import torch.distributed as dist
    spec, a, b, batches = setup("mlp", n_batches=2)
    if rank == world - 1:
        os._exit(0)
    return autoperm.activation_matching(spec, a, b, batches, progress=False, process_group=dist.group.WORLD)


def rank_hangs(rank, world, timeout):
    """The last rank stays alive but never joins: the others give up after the group's timeout."""
    import autoperm
    import torch.distributed as dist
    spec, a, b, batches = setup("mlp", n_batches=2)
    if rank == world - 1:
        time.sleep(2 * timeout)
        return None
    return autoperm.weight_matching(spec, a.state_dict(), b.state_dict(), progress=False,
                                    process_group=dist.group.WORLD)


def mismatch(rank, world, timeout):
    """Rank 1 holds a wider MLP (another spec), or the same architecture with other weights."""
    import autoperm
    import torch.distributed as dist
    out = {}
    for what in ("spec", "weights"):
        spec, a, b, batches = setup("mlp", n_batches=2, width=48 if what == "spec" and rank == 1 else 32)
        if what == "weights" and rank == 1:
            a = copy.deepcopy(a)
            with torch.no_grad():
                a[0].weight.add_(1.0)
        try:
            autoperm.activation_matching(spec, a, b, batches, progress=False, process_group=dist.group.WORLD)
            out[what] = None
        except ValueError as e:
            out[what] = str(e)
    spec, a, b, _ = setup("mlp", n_batches=2)
    keys = [k for k in list(a.state_dict())[rank::world] if k != "2.bias"]  # no rank holds 2.bias
    try:
        autoperm.weight_matching(spec, {k: a.state_dict()[k] for k in keys}, {k: b.state_dict()[k] for k in keys},
                                 progress=False, process_group=dist.group.WORLD)
        out["missing"] = None
    except ValueError as e:
        out["missing"] = str(e)
    from autoperm import distributed
    distributed.barrier(dist.group.WORLD, timeout=timeout)
    return out


SCENARIOS = {"match": match, "rank_dies": rank_dies, "rank_hangs": rank_hangs}


# -- launching -------------------------------------------------------------------------------------
def _worker(rank, world, store, outdir, scenario, timeout):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = {"ok": SCENARIOS[scenario](rank, world, timeout)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.monotonic() - _start
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)  # not destroy_process_group: a peer may be gone


_start = time.monotonic()


def launch(world: int, scenario: str, deadline: float = 240.0, timeout: float = _TIMEOUT) -> list:
    """Run ``scenario`` on ``world`` gloo ranks; ``[result of rank r or None]``.

    Each result is ``{"ok": value}`` or ``{"error": type name, "message": ...}``, with ``seconds``
    from the rank's start; a process still running after ``deadline`` seconds is killed."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        store = os.path.join(outdir, "store")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        procs = [ctx.Process(target=_worker, args=(r, world, store, outdir, scenario, timeout), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for r in range(world):
            path = os.path.join(outdir, f"rank{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return results
