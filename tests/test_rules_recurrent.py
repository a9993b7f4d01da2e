"""Toy models for the fused recurrent ops (LSTM, GRU, RNN) and for im2col/col2im (F.unfold / F.fold)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rule_helpers import spec_and_error

TOL = 1e-5


class _Recurrent(nn.Module):
    """Linear -> recurrent layer -> linear on the outputs (and, optionally, on the final hidden state)."""

    def __init__(self, cell, use_final=False, learned_state=False, **kw):
        super().__init__()
        self.kw, self.use_final = kw, use_final
        self.inp = nn.Linear(3, 6)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell](6, 5, **kw)
        dirs = 2 if kw.get("bidirectional") else 1
        units = kw.get("proj_size") or 5
        self.out = nn.Linear(dirs * units, 2)
        self.fin = nn.Linear(units, 2)
        self.h0 = nn.Parameter(torch.randn(kw.get("num_layers", 1) * dirs, 1, units)) if learned_state else None

    def forward(self, x):  # x: (N, T, 3)
        h = self.inp(x)
        if not self.kw.get("batch_first"):
            h = h.transpose(0, 1)
        args = ()
        if self.h0 is not None:
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous()
            args = ((h0, torch.zeros(h0.shape[0], x.shape[0], 5)),) if isinstance(self.rnn, nn.LSTM) else (h0,)
        y, state = self.rnn(h, *args)
        hn = state[0] if isinstance(state, tuple) else state
        out = self.out(y.mean(1 if self.kw.get("batch_first") else 0))
        return out + self.fin(hn[-1]) if self.use_final else out


CASES = [
    ("lstm", {}), ("lstm", {"batch_first": True}), ("lstm", {"bidirectional": True, "batch_first": True}),
    ("lstm", {"num_layers": 2}), ("lstm", {"num_layers": 2, "bidirectional": True}), ("lstm", {"bias": False}),
    ("lstm", {"proj_size": 3}), ("lstm", {"proj_size": 3, "num_layers": 2, "bidirectional": True}),
    ("gru", {}), ("gru", {"num_layers": 2, "bidirectional": True, "batch_first": True}),
    ("rnn", {}), ("rnn", {"nonlinearity": "relu", "num_layers": 2}),
]


@pytest.mark.parametrize("use_final,learned", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("cell,kw", CASES, ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in CASES])
def test_recurrent_hidden_units_permute_and_outputs_hold(cell, kw, use_final, learned):
    spec, err = spec_and_error(_Recurrent(cell, use_final, learned, **kw), torch.randn(2, 4, 3))
    assert not spec.unsupported
    assert err < TOL
    members = {(m.key, m.axis) for g in spec.groups for m in g.members}
    assert ("rnn.weight_hh_l0", 0) in members  # the hidden units of the first layer are permuted
    assert ("rnn.weight_ih_l0", 1) in members and ("inp.weight", 0) in members


def test_lstm_gate_factor_is_pinned_not_grouped():
    spec, _ = spec_and_error(_Recurrent("lstm"), torch.randn(2, 4, 3))
    group = next(g for g in spec.groups if any(m.key == "rnn.weight_hh_l0" and m.axis == 0 for m in g.members))
    assert group.size == 5  # hidden units, not 4 gates x 5
    assert any("gate axis of lstm" in p.reason for p in spec.pinned)


class _Patches(nn.Module):
    """Conv -> im2col (F.unfold) -> mix within patches -> col2im (F.fold) -> conv, as in VOLO/TNT."""

    def __init__(self, fold):
        super().__init__()
        self.fold = fold
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.w = nn.Parameter(torch.randn(9))

    def forward(self, x):
        h = self.a(x)
        n, c, hh, ww = h.shape
        p = F.unfold(h, 3, padding=1, stride=1)  # (N, C*9, L)
        p = p.reshape(n, c, 9, -1) * self.w[:, None]
        if self.fold:
            return self.b(F.fold(p.reshape(n, c * 9, -1), (hh, ww), 3, padding=1))
        return self.b(p.sum(2).reshape(n, c, hh, ww))


@pytest.mark.parametrize("fold", [False, True])
def test_im2col_and_col2im_keep_channels(fold):
    spec, err = spec_and_error(_Patches(fold), torch.randn(2, 3, 5, 5))
    assert not spec.unsupported
    assert err < TOL
    groups = [{(m.key, m.axis) for m in g.members} for g in spec.groups]
    assert {("a.weight", 0), ("a.bias", 0), ("b.weight", 1)} in groups
