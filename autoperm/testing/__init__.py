"""Testing tools: a generator of random architectures and the soundness checks run on each.

>>> from autoperm.testing import random_architecture, check_architecture
>>> arch = random_architecture(seed=7)
>>> report = check_architecture(arch)
>>> report["invariance"] < 1e-8
True

``tests/test_fuzz.py`` draws architectures with hypothesis (``architectures()``);
``benchmarks/fuzz_large.py`` runs a seed range and records the totals in ``docs/reliability.md``.
"""
from ._arch import Architecture, Chooser, RandomChooser, generate, random_architecture
from ._check import FuzzFailure, architectures, check_architecture

__all__ = ["Architecture", "Chooser", "RandomChooser", "generate", "random_architecture", "architectures",
           "check_architecture", "FuzzFailure"]
