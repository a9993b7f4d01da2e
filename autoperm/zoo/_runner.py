"""Run many models, each in a child process that a timeout, a crash or running out of memory cannot outlive."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import threading
from dataclasses import fields
from typing import Callable, Iterable

from ._check import ZooRecord, check_model
from ._registry import ZooEntry, timm_params

__all__ = ["run_models", "read_records", "write_records", "BYTES_PER_PARAM"]

# Peak memory per parameter of a check: the model, the two copies check_invariance permutes, a
# permuted state dict and the matchers' working copies, all float32.
BYTES_PER_PARAM = 4 * 6


def _serve(conn, threads: int, memory_gb: float | None) -> None:
    """Child process: check the entries it is sent, one at a time, under an address-space limit."""
    import resource

    import torch

    torch.set_num_threads(threads)
    if memory_gb:
        limit = int(memory_gb * 2 ** 30) + 4 * 2 ** 30  # + what importing torch maps without using
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            entry, kwargs = conn.recv()
        except EOFError:
            return
        conn.send(check_model(entry, **kwargs).to_dict())


class _Worker:
    """A long-lived child process; replaced after a timeout or a crash."""

    def __init__(self, threads: int, memory_gb: float | None):
        self.args = (threads, memory_gb)
        self._start()

    def _start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *self.args), daemon=True)
        self.proc.start()
        child.close()

    def check(self, entry: ZooEntry, timeout: float, **kwargs) -> ZooRecord:
        self.conn.send((entry, kwargs))
        why = None
        if self.conn.poll(timeout):
            try:
                return ZooRecord(**self.conn.recv())
            except EOFError:
                self.proc.join(5)
                code = self.proc.exitcode
                why = f"the process checking it died (exit code {code}" + (
                    ", killed: out of memory?)" if code == -9 else ")")
        else:
            why = f"timed out after {timeout:g} s"
        self.close()
        self._start()
        return ZooRecord(entry.name, entry.family, status="error", stage="timeout" if "timed" in why else "crash",
                         reason=why, time_s=float(timeout) if "timed" in why else 0.0)

    def close(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def read_records(path: str) -> list[ZooRecord]:
    """Records from a JSON-lines file; a later line for a model replaces an earlier one."""
    names = {f.name for f in fields(ZooRecord)}
    out: dict[str, ZooRecord] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    out[d["name"]] = ZooRecord(**{k: v for k, v in d.items() if k in names})
    return list(out.values())


def write_records(records: list[ZooRecord], path: str) -> None:
    """Write ``records`` to ``path`` as JSON lines (replacing the file), the form :func:`read_records` reads."""
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict()) + "\n")


def _too_large(entry: ZooEntry, memory_gb: float | None) -> ZooRecord | None:
    if not memory_gb or ":" in entry.name:
        return None
    params = timm_params([entry.name])[entry.name]
    need = params * BYTES_PER_PARAM / 2 ** 30
    if need <= memory_gb:
        return None
    return ZooRecord(entry.name, entry.family, status="skip", stage="size", params=params,
                     reason=f"too large: {params / 1e6:.0f}M parameters need about {need:.0f} GB, limit {memory_gb:g} GB")


def run_models(entries: Iterable[ZooEntry], *, jobs: int = 1, threads: int = 1, timeout: float = 600,
               memory_gb: float | None = 24, jsonl: str | None = None, skip: Iterable[str] = (),
               on_record: Callable[[ZooRecord], None] | None = None, **check_kwargs) -> list[ZooRecord]:
    """Check ``entries`` in ``jobs`` child processes; records in input order (also appended to ``jsonl``).

    Names in ``skip`` are left out (already recorded). Each child uses ``threads`` threads and at
    most ``memory_gb`` of address space; a model whose parameters alone would need more is
    skipped with that reason, one that exceeds ``timeout`` seconds or crashes its child gets an
    ``error`` record and a fresh child takes the next model.
    """
    entries = [e for e in entries if e.name not in set(skip)]
    results: dict[int, ZooRecord] = {}
    todo: queue.Queue = queue.Queue()
    for i, e in enumerate(entries):
        todo.put((i, e))
    lock = threading.Lock()

    def record(i, rec):
        with lock:
            results[i] = rec
            if jsonl:
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec.to_dict()) + "\n")
            if on_record:
                on_record(rec)

    def drive():
        worker = None
        try:
            while True:
                try:
                    i, e = todo.get_nowait()
                except queue.Empty:
                    return
                rec = _too_large(e, memory_gb)
                if rec is None:
                    worker = worker or _Worker(threads, memory_gb)
                    rec = worker.check(e, timeout, **check_kwargs)
                record(i, rec)
        finally:
            if worker is not None:
                worker.close()

    pool = [threading.Thread(target=drive, daemon=True) for _ in range(max(1, min(jobs, len(entries))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return [results[i] for i in sorted(results)]
