"""Bad inputs and the error each one gets: one table for the tests and for docs/reliability.md.

Each :class:`BadInput` builds its inputs afresh, calls one public function, and states the
exception type and a regular expression its message must match (``None``: the call is allowed
and must succeed, with the reason in ``note``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

__all__ = ["BadInput", "cases", "run_case", "table_markdown"]


@dataclass(frozen=True)
class BadInput:
    name: str
    call: str  # the function called, as a user would write it
    run: Callable[[], object]
    error: type | None  # None: accepted
    match: str = ""  # regex the message must match
    note: str = ""


def _mlp(seed: int = 0, hidden: int = 8, extra: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2)]
    if extra:
        layers += [nn.ReLU(), nn.Linear(2, 2)]
    return nn.Sequential(*layers)


def _x():
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def _spec(model=None):
    from .. import infer_spec

    return infer_spec(model if model is not None else _mlp(), _x())


def _perm(spec, seed=1):
    from .. import random_permutation

    return random_permutation(spec, seed)


def _with(key, value, model=None):
    sd = {k: v.clone() for k, v in (model or _mlp()).state_dict().items()}
    if value is None:
        del sd[key]
    elif callable(value):
        sd[key] = value(sd[key])
    else:
        sd[key] = value
    return sd


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


def _model_with(key, fn):
    m = _mlp()
    m.load_state_dict(_with(key, fn))
    return m


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -x  # control flow on a value: export cannot specialise it


class _NanOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return torch.log(self.fc2(torch.relu(self.fc1(x))) - 1e3)  # log of negatives: NaN


class _IntBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("order", torch.arange(8))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))[:, self.order])


def _wm(a, b, **kw):
    from .. import weight_matching

    spec = _spec()
    return weight_matching(spec, a, b, progress=False, **kw)


def _api():
    import autoperm

    return autoperm


def _cases() -> list[BadInput]:
    ap = _api()
    from ..permutation import validate_permutation

    sd = lambda: _mlp().state_dict()  # noqa: E731
    g = "0.weight:0"
    return [
        # -- infer_spec --------------------------------------------------------------------------
        BadInput("not a module", "infer_spec(fn, x)", lambda: ap.infer_spec(lambda x: x, _x()), TypeError,
                 r"needs a torch.nn.Module, got function"),
        BadInput("model fails to trace (control flow on values)", "infer_spec(model, x)",
                 lambda: ap.infer_spec(_DataDependent(), _x()), ap.TraceError,
                 r"torch.export failed for _DataDependent: .*data-dependent"),
        BadInput("example input of the wrong shape", "infer_spec(mlp, randn(3, 5))",
                 lambda: ap.infer_spec(_mlp(), torch.randn(3, 5)), ap.TraceError,
                 r"torch.export failed for Sequential: RuntimeError: .*\[3, 5\]"),
        BadInput("example input of the wrong rank", "infer_spec(conv2d, randn(3, 4))",
                 lambda: ap.infer_spec(nn.Conv2d(3, 4, 3), torch.randn(3, 4)), ap.TraceError,
                 r"torch.export failed for Conv2d: RuntimeError: .*conv2d"),
        BadInput("example inputs in a list", "infer_spec(mlp, [x])", lambda: ap.infer_spec(_mlp(), [_x()]),
                 ap.TraceError, r"torch.export failed for Sequential: TypeError"),
        BadInput("NaN or inf weights", "infer_spec(model_with_nan, x)",
                 lambda: ap.infer_spec(_model_with("0.weight", _nan), _x()).group_sizes, None,
                 note="accepted: the spec depends on shapes only (same spec as the clean model)"),
        BadInput("half-precision model", "infer_spec(mlp.half(), x.half())",
                 lambda: ap.infer_spec(_mlp().half(), _x().half()).group_sizes, None,
                 note="accepted: same spec as float32"),
        BadInput("integer buffer feeding the graph", "infer_spec(model, x)",
                 lambda: ap.infer_spec(_IntBuffer(), _x()).pinned, None,
                 note="accepted: integer tensors are pinned ('integer buffer'); the axis it indexes is pinned"),
        # -- apply_permutation -------------------------------------------------------------------
        BadInput("state dict of another architecture (other width)", "apply_permutation(spec, perm, other)",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _mlp(hidden=6).state_dict()), ValueError,
                 r"'0.weight' has shape \(6, 4\), the spec expects \[8, 4\]"),
        BadInput("state dict of another architecture (extra layer)", "apply_permutation(spec, perm, other)",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _mlp(extra=True).state_dict()), ValueError,
                 r"keys the spec's model does not have: \['4.weight', '4.bias'\]"),
        BadInput("missing key", "apply_permutation(spec, perm, sd without '2.weight')",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _with("2.weight", None)), KeyError,
                 r"no key '2.weight' that the spec permutes"),
        BadInput("unexpected key", "apply_permutation(spec, perm, sd + {'extra': ...})",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _with("extra", torch.zeros(3))), ValueError,
                 r"keys the spec's model does not have: \['extra'\]"),
        BadInput("shape mismatch", "apply_permutation(spec, perm, sd with '0.bias' of size 7)",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _with("0.bias", torch.zeros(7))), ValueError,
                 r"'0.bias' has shape \(7,\), the spec expects \[8\]"),
        BadInput("value that is not a tensor", "apply_permutation(spec, perm, sd with '0.bias': list)",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _with("0.bias", [0.0] * 8)), ValueError,
                 r"'0.bias' is not a tensor \(list\)"),
        BadInput("NaN or inf weights", "apply_permutation(spec, perm, sd_with_nan)",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), _with("0.weight", _nan)), None,
                 note="accepted: permuting moves values exactly, NaN included"),
        BadInput("integer tensors", "apply_permutation(spec, perm, {k: v.long()})",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), {k: (v * 10).long() for k, v in sd().items()}),
                 None, note="accepted: permuted exactly, dtype kept"),
        BadInput("half-precision tensors", "apply_permutation(spec, perm, {k: v.half()})",
                 lambda: ap.apply_permutation(_spec(), _perm(_spec()), {k: v.half() for k, v in sd().items()}),
                 None, note="accepted: permuted exactly, dtype kept"),
        BadInput("permutation of the wrong length", "apply_permutation(spec, {g: arange(7)}, sd)",
                 lambda: ap.apply_permutation(_spec(), {g: torch.arange(7)}, sd()), ValueError,
                 r"group '0.weight:0': permutation has shape \(7,\), the group has size 8"),
        BadInput("not a permutation (repeated index)", "validate_permutation(spec, {g: [0, 0, 1, ...]})",
                 lambda: validate_permutation(_spec(), {g: torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])}), ValueError,
                 r"group '0.weight:0': not a permutation of 0..7"),
        BadInput("not a permutation (out of range)", "validate_permutation(spec, {g: arange(8) + 1})",
                 lambda: validate_permutation(_spec(), {g: torch.arange(8) + 1}), ValueError,
                 r"group '0.weight:0': not a permutation of 0..7"),
        BadInput("permutation of floats", "validate_permutation(spec, {g: arange(8.0)})",
                 lambda: validate_permutation(_spec(), {g: torch.arange(8.0)}), ValueError,
                 r"group '0.weight:0': permutation must be an integer tensor, got torch.float32"),
        BadInput("permutation of another shape", "validate_permutation(spec, {g: arange(8).view(2, 4)})",
                 lambda: validate_permutation(_spec(), {g: torch.arange(8).view(2, 4)}), ValueError,
                 r"group '0.weight:0': permutation has shape \(2, 4\), the group has size 8"),
        BadInput("permutation missing a group", "validate_permutation(spec, {})",
                 lambda: validate_permutation(_spec(), {}), ValueError, r"no entry for group '0.weight:0'"),
        BadInput("permutation naming unknown groups", "validate_permutation(spec, {g: ..., 'zzz': ...})",
                 lambda: validate_permutation(_spec(), {g: torch.arange(8), "zzz": torch.arange(2)}), ValueError,
                 r"groups the spec does not have: \['zzz'\]"),
        BadInput("inverse of a non-permutation", "inverse_permutation({g: [0, 0, 1]})",
                 lambda: ap.inverse_permutation({g: torch.tensor([0, 0, 1])}), ValueError,
                 r"group '0.weight:0': not a permutation of 0..2"),
        BadInput("composing permutations of different sizes", "compose_permutations({g: arange(8)}, {g: arange(7)})",
                 lambda: ap.compose_permutations({g: torch.arange(8)}, {g: torch.arange(7)}), ValueError,
                 r"group '0.weight:0': permutations of sizes 8 and 7 do not compose"),
        BadInput("permute_model_ with a bad permutation", "permute_model_(mlp, spec, {g: arange(7)})",
                 lambda: ap.permute_model_(_mlp(), _spec(), {g: torch.arange(7)}), ValueError,
                 r"group '0.weight:0': permutation has shape \(7,\)"),
        # -- check_invariance --------------------------------------------------------------------
        BadInput("NaN weights", "check_invariance(model_with_nan, spec, x)",
                 lambda: ap.check_invariance(_model_with("0.weight", _nan), _spec(), _x()), ValueError,
                 r"tensors with NaN or inf values: \['0.weight'\]"),
        BadInput("inf weights reaching the output", "check_invariance(model_with_inf_weight, spec, x)",
                 lambda: ap.check_invariance(_model_with("0.weight", _inf), _spec(), _x()), ValueError,
                 r"tensors with NaN or inf values: \['0.weight'\]: outputs cannot show"),
        BadInput("inf output bias", "check_invariance(model_with_inf_output_bias, spec, x)",
                 lambda: ap.check_invariance(_model_with("2.bias", _inf), _spec(), _x()), ValueError,
                 r"tensors with NaN or inf values: \['2.bias'\]"),
        BadInput("outputs with NaN", "check_invariance(model computing log(-1), spec, x)",
                 lambda: ap.check_invariance(_NanOutput(), _spec(_NanOutput()), _x()), ValueError,
                 r"model output 0 has NaN values: outputs cannot show"),
        BadInput("example input of the wrong shape", "check_invariance(mlp, spec, randn(3, 5))",
                 lambda: ap.check_invariance(_mlp(), _spec(), torch.randn(3, 5)), ValueError,
                 r"Sequential fails on example inputs of shapes \[\(3, 5\)\]"),
        BadInput("spec of another architecture", "check_invariance(other_mlp, spec, x)",
                 lambda: ap.check_invariance(_mlp(hidden=6), _spec(), _x()), ValueError,
                 r"'0.weight' has shape \(6, 4\), the spec expects \[8, 4\]"),
        # -- weight_matching ---------------------------------------------------------------------
        BadInput("state dict of another architecture", "weight_matching(spec, a, other)",
                 lambda: _wm(sd(), _mlp(hidden=6).state_dict()), ValueError,
                 r"state_b\['0.weight'\] has shape \(6, 4\), the spec expects \(8, 4\)"),
        BadInput("missing key", "weight_matching(spec, a, b without '2.weight')",
                 lambda: _wm(sd(), _with("2.weight", None)), ValueError,
                 r"state_b has no key '2.weight' that the spec permutes"),
        BadInput("NaN weights", "weight_matching(spec, a, b_with_nan)", lambda: _wm(sd(), _with("0.weight", _nan)),
                 ValueError, r"state_b\['0.weight'\] has NaN or infinite values"),
        BadInput("inf weights", "weight_matching(spec, a_with_inf, b)", lambda: _wm(_with("0.bias", _inf), sd()),
                 ValueError, r"state_a\['0.bias'\] has NaN or infinite values"),
        BadInput("integer tensors", "weight_matching(spec, {k: v.long()}, ...)",
                 lambda: _wm({k: (v * 10).long() for k, v in sd().items()}, sd()), ValueError,
                 r"state_a\['0.weight'\] must be floating point, got torch.int64"),
        BadInput("half-precision tensors", "weight_matching(spec, {k: v.half()}, {k: v.half()})",
                 lambda: _wm({k: v.half() for k, v in sd().items()}, {k: v.half() for k, v in sd().items()}), None,
                 note="accepted: costs are computed in float32"),
        BadInput("init that is not a permutation", "weight_matching(spec, a, b, init={g: arange(7)})",
                 lambda: _wm(sd(), sd(), init={g: torch.arange(7)}), ValueError,
                 r"group '0.weight:0': permutation has shape \(7,\)"),
        # -- spec files --------------------------------------------------------------------------
        BadInput("spec JSON of something else", "PermutationSpec.from_json('{}')",
                 lambda: ap.PermutationSpec.from_json("{}"), ValueError, r"not an autoperm spec"),
    ]


def run_case(case: BadInput):
    """Run a case; returns (exception or None, result)."""
    try:
        return None, case.run()
    except Exception as e:  # noqa: BLE001 - the caller compares with the expected type
        return e, None


def cases() -> list[BadInput]:
    """Every case (built on call: they import the package)."""
    return _cases()


def table_markdown() -> str:
    """The table for docs/reliability.md, from running every case now (messages as raised)."""
    lines = ["| bad input | call | error |", "|---|---|---|"]
    for c in cases():
        e, _ = run_case(c)
        if e is None:
            got = c.note or "accepted"
        else:
            msg = str(e).split("\n")[0].replace("|", "\\|")
            if len(msg) > 160:
                msg = msg[:157] + "..."
            got = f"`{type(e).__name__}`: {msg}"
        lines.append(f"| {c.name} | `{c.call}` | {got} |")
    return "\n".join(lines)
