"""Every known failure of the zoo tests, in one table: ``(model, test kind)`` with the reason.

Each entry is strict: when a fix makes the test pass, the run fails until the entry is removed.
Kinds: ``trace``, ``snapshot``, ``invariance``, ``planted_weight``, ``planted_activation``.
"""
import pytest


def _known(model: str, kind: str, reason: str):
    return pytest.param(model, kind, marks=pytest.mark.xfail(strict=True, reason=reason))


KNOWN_FAILURES = [
    _known("sequencer2d_s", "trace", "aten.lstm.input (nodes lstm, lstm_1, ...) has no rule: an LSTM's hidden units "
           "permute only as whole gate blocks of weight_ih/weight_hh, which needs a structured rule; its axes are "
           "pinned (the model still passes invariance and planted recovery)"),
    _known("tnt_s_legacy_patch16_224", "trace", "aten.im2col.default (node im2col, nn.Unfold) has no rule: the "
           "unfolded axis interleaves channels with kernel positions; its axes are pinned (invariance passes)"),
    _known("volo_d1_224", "trace", "aten.im2col.default / aten.col2im.default (nodes im2col, col2im, outlook "
           "attention's nn.Unfold / nn.Fold) have no rule; their axes are pinned (invariance passes)"),
]
