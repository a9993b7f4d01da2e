"""Models larger than memory: Llama-shaped folders generated on disk, aligned and written by streaming.

Generates synthetic checkpoints with the exact shapes of Llama-3.2-1B (one 2.47 GB file, as on the
Hub) and Llama-3-8B (16.1 GB in four shards of at most 5 GB, as on the Hub): random bf16 weights,
written tensor by tensor (never a whole model in memory), a config.json, an index, a tokenizer
file. A second copy with a planted random permutation is written by ``write_permuted_folder``.
Every measured step runs in a child process that reports its wall time and peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``).

    python benchmarks/bench_outofcore.py 1b            # generate, plant, `autoperm align`, load whole
    python benchmarks/bench_outofcore.py 8b            # generate, spec, plant; time every group kind
    python benchmarks/bench_outofcore.py solver        # the exact solvers on 2,048 ... 14,336 units
    python benchmarks/bench_outofcore.py clean         # delete the generated folders

Files go to $AUTOPERM_BENCH_DIR (default /tmp/autoperm_outofcore); 1b needs 7.5 GB there, 8b 32 GB.
Results are appended to results.jsonl there and printed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time

import torch

ROOT = os.environ.get("AUTOPERM_BENCH_DIR", "/tmp/autoperm_outofcore")
COMMON = dict(rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
              architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", use_cache=False)
CONFIGS = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               max_position_embeddings=131072, **COMMON),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               max_position_embeddings=8192, **COMMON),
}
CONFIGS["tiny"] = dict(CONFIGS["1b"], vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # a smoke test of this script
TIMED_ELEMENTS = 64 << 20
SHARD = {"1b": None, "8b": 5_000_000_000, "tiny": 100_000}  # the Hub's layouts: one file; shards of at most 5 GB


# -- generating -----------------------------------------------------------------------------------
def generate(name: str, folder: str, seed: int = 0) -> None:
    """Write a random bf16 checkpoint of ``CONFIGS[name]``'s shapes to ``folder``, tensor by tensor."""
    import transformers

    from autoperm.folder import meta_model

    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    tmp = folder + ".generating"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    transformers.LlamaConfig(**CONFIGS[name]).save_pretrained(tmp)
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        f.write("{}\n")
    from autoperm.folder._model import tied_aliases

    model = meta_model(tmp)
    tied = tied_aliases(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    limit = SHARD[name]
    shards, size = [[]], 0
    for k, s in shapes.items():
        n = math.prod(s) * 2
        if limit and size + n > limit and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    gen = torch.Generator().manual_seed(seed)
    for fname, keys in zip(names, shards):
        _write_random(os.path.join(tmp, fname), {k: shapes[k] for k in keys}, gen)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())},
                 "weight_map": {k: f for f, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    os.replace(tmp, folder)


def _write_random(path: str, shapes: dict, gen: torch.Generator) -> None:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for k, s in shapes.items():
        n = math.prod(s) * 2
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for k, s in shapes.items():
            rows = s[0]
            per = max(1, (1 << 26) // max(1, math.prod(s[1:])))  # 64 M elements at a time
            for r in range(0, rows, per):
                chunk = (min(per, rows - r), *s[1:])
                t = torch.randn(chunk, generator=gen)
                if len(s) == 1:  # norm weights: around 1
                    t = 1 + 0.1 * t
                else:
                    t *= 0.02
                f.write(t.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())


# -- measured steps (each in a child process) --------------------------------------------------------
def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB -> GB


def step_spec(folder: str) -> dict:
    from autoperm.folder import open_folder

    fm = open_folder(folder)
    t = time.perf_counter()
    spec = fm.spec()
    return {"groups": len(spec.group_sizes), "units": spec.num_units, "spec_s": time.perf_counter() - t,
            "weights_gb": fm.files.nbytes / 1e9}


def step_plant(src: str, dst: str, seed: str) -> dict:
    from autoperm import random_permutation
    from autoperm.folder import open_folder, write_permuted_folder
    from autoperm.io import permutation_to_dict

    fm = open_folder(src)
    t0 = time.perf_counter()
    spec = fm.spec()
    t1 = time.perf_counter()
    perm = random_permutation(spec, int(seed))
    with open(dst + ".planted.json", "w") as f:
        json.dump(permutation_to_dict(perm), f)
    write_permuted_folder(src, dst, spec, perm, files=fm.files)
    return {"spec_s": t1 - t0, "write_s": time.perf_counter() - t1, "weights_gb": fm.files.nbytes / 1e9}


def step_align(a: str, b: str, out: str) -> dict:
    from autoperm.cli import main

    rc = main(["align", a, b, "-o", out, "--perm-out", out + ".perm.json"])
    return {"rc": rc}


def step_whole(a: str, b: str) -> dict:
    """Both models loaded whole, as the in-memory path does (bf16 kept), every tensor touched once (the
    safetensors loader may map the files: their pages count once they are read, as matching reads them)."""
    from autoperm.folder import WeightFiles
    from autoperm.io import load_checkpoint

    n = 0
    states = []
    for folder in (a, b):
        state = {}
        for f in WeightFiles(folder).files:
            state.update(load_checkpoint(os.path.join(folder, f)))
        n += sum(float(t.sum()) * 0 + t.numel() * t.element_size() for t in state.values())
        states.append(state)
    return {"state_gb": n / 1e9}


def step_groups(a: str, b: str) -> dict:
    """Time one cost + assignment of every group kind (layer 0 stands for every layer); extrapolate a sweep.

    Each kind's cost is timed on its first units up to ``TIMED_ELEMENTS`` elements (at least one
    unit; for a group on every layer, layer 0's units) and scaled by element count: the products are
    linear in it. The assignment is timed on the full-size matrix."""
    import numpy as np

    from autoperm.folder import open_folder
    from autoperm.folder.match import SlabCostCache
    from autoperm.matching._costs import build_layout
    from autoperm.matching._lap import solve_numpy

    fa = open_folder(a)
    fb = open_folder(b, fa.model)
    spec = fa.spec()
    layout = build_layout(spec, torch.device("cpu"))
    sa, sb = fa.state(1 << 27), fb.state(1 << 27)
    costs = SlabCostCache(spec, sa, sb, torch.float32)
    perm = {g: torch.arange(n) for g, n in spec.group_sizes.items()}
    kinds: dict = {}
    for g in spec.group_sizes:
        kinds.setdefault(re.sub(r"layers\.\d+\.", "layers.N.", g), []).append(g)
    numel = lambda us: sum(math.prod(sa.info(u.key).shape) for u in us)  # noqa: E731
    out = {}
    for kind, names in kinds.items():
        g = names[0]
        units = layout.units[g]
        if not units:
            continue
        timed, total = [], 0  # the first units, up to 64 M elements (at least one): products are linear in them
        for u in ([u for u in units if "layers.0." in u.key] if len(units) > 16 else units):
            if timed and total + numel([u]) > TIMED_ELEMENTS:
                break
            timed.append(u)
            total += numel([u])
        t0 = time.perf_counter()
        c = costs.cost(None, timed, perm)
        t1 = time.perf_counter()
        cost_s = (t1 - t0) * numel(units) / numel(timed)
        c = np.ascontiguousarray(c.double().numpy())
        t2 = time.perf_counter()
        solve_numpy(c)
        t3 = time.perf_counter()
        out[kind] = {"count": len(names), "size": spec.group_sizes[g], "units": len(units), "timed_units": len(timed),
                     "elements": numel(units), "cost_s": cost_s, "solve_s": t3 - t2,
                     "gflop_per_s": 2 * spec.group_sizes[g] * numel(timed) / (t1 - t0) / 1e9}
        print(kind, out[kind], file=sys.stderr, flush=True)
    sweep = sum(v["count"] * (v["cost_s"] + v["solve_s"]) for v in out.values())
    return {"kinds": out, "sweep_s": sweep, "groups": len(spec.group_sizes)}


def step_solver(n: str, kind: str) -> dict:
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from autoperm.matching._lap import solve_numpy

    n = int(n)
    rng = np.random.default_rng(0)
    cost = rng.standard_normal((n, n))
    if kind == "planted":  # a true matching that stands out, as between a model and its permuted copy
        cost[np.arange(n), rng.permutation(n)] += 3.0
    t = time.perf_counter()
    p = solve_numpy(cost)
    t_lap = time.perf_counter() - t
    r = {"n": n, "kind": kind, "lap_s": t_lap}
    if os.environ.get("BENCH_SCIPY", "1") == "1":
        t = time.perf_counter()
        _, q = linear_sum_assignment(cost, maximize=True)
        r["scipy_s"] = time.perf_counter() - t
        rows = np.arange(n)
        r["same_optimum"] = bool(abs(cost[rows, p].sum() - cost[rows, q].sum()) < 1e-9 * n)
    return r


STEPS = {"spec": step_spec, "plant": step_plant, "align": step_align, "whole": step_whole,
         "groups": step_groups, "solver": step_solver}


def _child(name: str, *args: str) -> None:
    torch.set_num_threads(1)
    t = time.perf_counter()
    r = STEPS[name](*args)
    r.update(step=name, args=list(args), wall_s=time.perf_counter() - t, peak_rss_gb=_rss_gb())
    print("RESULT " + json.dumps(r), flush=True)


def run(name: str, *args: str) -> dict:
    """Run step ``name`` in a fresh child process; its result, also appended to results.jsonl."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, __file__, "_child", name, *args], env=env, capture_output=True, text=True)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"step {name} {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["log"] = [ln for ln in p.stderr.splitlines() if ln and "it/s]" not in ln][-8:]
    with open(os.path.join(ROOT, "results.jsonl"), "a") as f:
        f.write(json.dumps(r) + "\n")
    print(json.dumps(r), flush=True)
    return r


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def pair(name: str) -> tuple[str, str]:
    a, b = os.path.join(ROOT, f"{name}-a"), os.path.join(ROOT, f"{name}-b")
    t = time.perf_counter()
    generate(name, a)
    print(f"generated {a} in {time.perf_counter() - t:.0f} s", flush=True)
    if not os.path.isfile(os.path.join(b, "config.json")):
        run("plant", a, b, "1")
    return a, b


def bench_1b(name: str = "1b") -> None:
    from autoperm import inverse_permutation
    from autoperm.io import permutation_from_dict

    a, b = pair(name)
    out = os.path.join(ROOT, f"{name}-aligned")
    run("align", a, b, out)
    planted = permutation_from_dict(json.load(open(b + ".planted.json")))
    found = permutation_from_dict(json.load(open(out + ".perm.json")))
    inv = inverse_permutation(planted)
    exact = all(torch.equal(found[g], inv[g]) for g in inv)
    shards = [f for f in os.listdir(a) if f.endswith(".safetensors")]
    same = all(_sha(os.path.join(a, f)) == _sha(os.path.join(out, f)) for f in shards)
    print(f"{name}: planted permutation recovered exactly: {exact}; aligned files byte-identical to A: {same}",
          flush=True)
    with open(os.path.join(ROOT, "results.jsonl"), "a") as f:
        f.write(json.dumps({"step": f"check-{name}", "recovered": exact, "byte_identical": same}) + "\n")
    run("whole", a, b)


def bench_8b() -> None:
    a, b = pair("8b")
    run("spec", a)
    run("groups", a, b)


def bench_solver() -> None:
    for n in (2048, 4096, 8192, 14336):
        for kind in ("random", "planted"):
            run("solver", str(n), kind)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "1b"
    if cmd == "_child":
        _child(*sys.argv[2:])
    else:
        os.makedirs(ROOT, exist_ok=True)
        if cmd == "clean":
            shutil.rmtree(ROOT)
        else:
            {"1b": bench_1b, "8b": bench_8b, "solver": bench_solver, "tiny": lambda: bench_1b("tiny")}[cmd]()
