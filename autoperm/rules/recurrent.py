"""Recurrent layers (LSTM, GRU, Elman RNN) as one fused op each. Hidden units permute; gates and time are pinned.

Per layer ``l`` and direction ``d`` the flat weights are ``w_ih (G*H, I)``, ``w_hh (G*H, R)``, then
``b_ih, b_hh (G*H)`` when biased and ``w_hr (P, H)`` with an LSTM projection (R = P, else R = H).
Gate rows are gate-major (``row = g*H + h``), so the row axis factors as gates x hidden: the gate
factor is pinned, the hidden factor is the layer's hidden units. A layer's output features are its
``R`` units, both directions concatenated; the next layer's ``w_ih`` reads them.
"""
from __future__ import annotations

from ._registry import builtin_rule, get_rule
from .creation import constant as _constant_rule


def _constant(node) -> bool:
    """A state made by a constant factory (the creation rules' own list) is unchanged by any permutation."""
    target = getattr(node, "target", None)
    return target is not None and get_rule(target) is _constant_rule


def _recurrent(ctx, kind, gates, x, states, params, has_biases, num_layers, bidirectional, batch_first):
    lx = ctx.lay(x)
    dirs = 2 if bidirectional else 1
    per = len(params) // (num_layers * dirs)
    proj = per - 2 - 2 * bool(has_biases)
    batched = len(lx) == 3
    t_ax = 1 if batched and batch_first else 0
    ctx.pin(lx[t_ax], f"time axis of {kind}")
    batch = lx[1 - t_ax] if batched else None
    feat, hidden, recur = lx[-1], [], []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            w = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            lw_ih, lw_hh = ctx.lay(w[0]), ctx.lay(w[1])
            size = ctx.shape(w[0])[0] // gates
            rows = [lw_ih[0], lw_hh[0]] + [ctx.lay(b)[0] for b in w[2:4] if has_biases]
            h = None
            for r in rows:
                g, hh = ctx.split_prod(r, [gates, size], f"gate rows of {kind}")
                ctx.pin(g, f"gate axis of {kind}")
                h = hh if h is None else ctx.union(h, hh)
            ctx.union(lw_ih[1], feat)
            r_out = h
            if proj:
                lw_hr = ctx.lay(w[-1])
                ctx.union(lw_hr[1], h)
                r_out = lw_hr[0]
            ctx.union(lw_hh[1], r_out)
            hidden.append(h)
            recur.append(r_out)
            outs.append(r_out)
        feat = ctx.cat(outs) if dirs == 2 else outs[0]
    # initial / final states: (layers*dirs, [N,] units); slice k belongs to layer-direction k.
    used = {u.args[1] for u in ctx.node.users if len(u.args) > 1 and isinstance(u.args[1], int)}
    state_units = [recur, hidden][:len(states)]
    tie = len(recur) > 1 and (any(i >= 1 for i in used) or not all(_constant(s) for s in states))
    if tie:  # slices would carry different permutations: make them one (coarser, still exact)
        for units in state_units:
            for u in units[1:]:
                ctx.union(units[0], u)
    finals = []
    for k, (s, units) in enumerate(zip(states, state_units)):
        ls = ctx.lay(s)
        ctx.pin(ls[0], f"layer-direction axis of {kind} state")
        if batched:
            ctx.union(ls[1], batch)
        if not _constant(s) or len(units) == 1 or tie:
            ctx.union(ls[-1], units[0])
        shape = ctx.out_shape()[1 + k]
        last = units[0] if len(units) == 1 or tie else ctx.fresh(shape[-1], f"unused final state of {kind} at {ctx.where}")
        finals.append((ctx.fresh(shape[0], f"layer-direction axis of {kind} state at {ctx.where}"),)
                      + ((batch,) if batched else ()) + (last,))
    out_t = ctx.fresh(ctx.out_shape()[0][t_ax], f"time axis of {kind} at {ctx.where}")
    out = (batch, out_t, feat) if batched and batch_first else ((out_t, batch, feat) if batched else (out_t, feat))
    return [out] + finals


@builtin_rule("aten.lstm.input")
def lstm(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """LSTM: W_ih/W_hh/b rows = 4 gates x hidden (gate pinned, hidden ~ units); W_ih[1] ~ input features;
    W_hh[1] ~ recurrent units (hidden, or W_hr[0] with a projection); output features = cat over directions."""
    return _recurrent(ctx, "lstm", 4, x, list(hx), list(params), has_biases, num_layers, bidirectional, batch_first)


@builtin_rule("aten.gru.input")
def gru(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """GRU: as LSTM with 3 gates (r, z, n) and one state."""
    return _recurrent(ctx, "gru", 3, x, [hx], list(params), has_biases, num_layers, bidirectional, batch_first)


@builtin_rule("aten.rnn_tanh.input", "aten.rnn_relu.input")
def rnn(ctx, x, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first):
    """Elman RNN: as LSTM with 1 gate and one state."""
    return _recurrent(ctx, "rnn", 1, x, [hx], list(params), has_biases, num_layers, bidirectional, batch_first)
