"""Every known failure of the zoo tests, in one table: ``(model, test kind)`` with the reason.

Each entry is strict: when a fix makes the test pass, the run fails until the entry is removed.
Kinds: ``trace``, ``snapshot``, ``invariance``, ``planted_weight``, ``planted_activation``.
``SLOW`` lists checks skipped in CI for time, with what was measured; ``AUTOPERM_ZOO_SLOW=1`` runs them.
"""
import os

import pytest


def _slow(model: str, kind: str, reason: str):
    """A check too slow for CI's budget: skipped with the measured reason unless AUTOPERM_ZOO_SLOW=1."""
    return pytest.param(model, kind, marks=pytest.mark.skipif(os.environ.get("AUTOPERM_ZOO_SLOW") != "1",
                                                              reason=reason))


def _known(model: str, kind: str, reason: str):
    return pytest.param(model, kind, marks=pytest.mark.xfail(strict=True, reason=reason))


KNOWN_FAILURES: list = []  # none: sequencer (LSTM), tnt (im2col) and volo (im2col/col2im) got rules

# Each exceeded the 300 s per-test limit in a CI run on 2 cores (2026-12-01, 2 workers); all three
# passed `autoperm zoo --planted` earlier the same day (364 s, 578 s and 236 s for the whole model).
SLOW = [
    _slow("deepseek_vit_412m", "planted_activation", "activation matching on a 412M-parameter model at 546x546 "
          "(with its float64 round-off run) took over 300 s in CI; AUTOPERM_ZOO_SLOW=1 runs it"),
    _slow("gemma4_vit_167m", "planted_activation", "activation matching at 768x768 (2,304 tokens) took over 300 s "
          "in CI; AUTOPERM_ZOO_SLOW=1 runs it"),
    _slow("nextvit_small", "planted_weight", "weight matching took over 300 s in CI (2 cores, 2 workers); "
          "AUTOPERM_ZOO_SLOW=1 runs it"),
]
