"""Shared by both suites: under pytest-xdist, each worker gets its share of the cores as torch threads.

Left alone, every worker starts one torch thread per core, so ``-n 2`` on 2 cores runs 4 busy
threads on 2 cores and OpenMP's waiting threads slow every model down.
"""
import os

import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))
