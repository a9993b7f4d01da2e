"""Check one model: build it, trace and infer its spec, permute at random, (optionally) plant and match."""
from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass, field

import torch

from .._float64 import float64_inputs, float64_model
from .._load import load_state_
from .._trace import TraceError
from .._infer import infer_spec
from ..check import check_invariance, randomize_
from ..equivalence import FLOOR_FACTOR, TOLERANCE, TOLERANCE_FLOAT64, roundoff_perturb_
from ..permutation import apply_permutation, random_permutation
from ..spec import PermutationSpec
from ._registry import ZooEntry

__all__ = ["ZooRecord", "build", "check_model", "has_batchnorm", "culprit_groups", "invariance_errors",
           "invariance_reason", "invariance_holds", "float64_errors", "planted_weight_matching",
           "planted_activation_matching", "pin_kinds", "noise_floor", "TOLERANCE", "TOLERANCE_FLOAT64"]

_DROP_KWARGS = ({"drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0}, {})


@dataclass
class ZooRecord:
    """What a zoo run learned about one model (JSON-ready via ``asdict``).

    ``status`` is ``pass`` (traced, at least one group, outputs unchanged in every mode checked),
    ``fail`` (traced, but no group or outputs changed or planted permutation not recovered),
    ``error`` (build, trace or inference raised, timed out or crashed) or ``skip`` (too large).
    ``reason`` says why in one line, naming the op and graph node where one is known.
    """

    name: str
    family: str = ""
    status: str = "error"
    stage: str = ""  # where a non-passing model stopped: build, trace, infer, groups, invariance, planted, ...
    reason: str = ""
    params: int = 0
    input_shape: list = field(default_factory=list)
    traced: bool = False
    groups: int = 0
    units: int = 0
    per_block: int | None = None  # groups per block of another group (None: a record made before they existed)
    per: dict = field(default_factory=dict)  # each group per block -> its block group
    permuted_fraction: float = 0.0
    pins: dict = field(default_factory=dict)  # pin reason (without its node) -> number of pinned axes
    pinned: list = field(default_factory=list)  # every pinned axis: "key:axis (size) reason"
    unsupported: list = field(default_factory=list)
    error_eval: float | None = None
    error_train: float | None = None
    error_float64: float | None = None  # when float32 exceeded the tolerance: the worst error in float64
    planted: dict = field(default_factory=dict)  # matcher -> "recovered" or why not
    infer_s: float = 0.0
    time_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def build(entry: ZooEntry | str, seed: int = 0, batch_size: int = 2):
    """``(model, example_inputs)``: the model in eval mode with every weight perturbed by ``randomize_``.

    A timm model is made without dropout or stochastic depth where its constructor accepts those
    arguments (functional dropout in train mode draws masks per position, which no permutation
    commutes with); its input is a random batch at ``pretrained_cfg["input_size"]`` unless the
    entry gives one. A ``module:factory`` goes through :func:`autoperm.models.resolve_model`.
    """
    from ..models import random_inputs, resolve_model

    entry = ZooEntry(entry) if isinstance(entry, str) else entry
    torch.manual_seed(seed)
    if ":" in entry.name:
        rm = resolve_model(entry.name, entry.input_shape, entry.model_args, batch_size, seed)
        model, x = rm.module, rm.example_inputs
    else:
        model = _create_timm(entry.name, entry.model_args)
        x = random_inputs([tuple(entry.input_shape or model.pretrained_cfg["input_size"])], batch_size, seed)
    randomize_(model, seed)
    return model.eval(), x[0] if len(x) == 1 else x


def _create_timm(name: str, model_args: dict) -> torch.nn.Module:
    import timm

    for extra in _DROP_KWARGS:
        try:
            return timm.create_model(name, pretrained=False, **{**extra, **model_args})
        except TypeError:
            if not extra:
                raise
    raise AssertionError("unreachable")


def has_batchnorm(model: torch.nn.Module) -> bool:
    """Whether the model behaves differently in train mode through batch statistics."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def pin_kinds(spec: PermutationSpec) -> dict[str, int]:
    """Pinned axes counted by reason, without the node (``"convolution kernel axis": 40``)."""
    return dict(collections.Counter(p.reason.split(" at ")[0] for p in spec.pinned).most_common())


def _only_groups(spec: PermutationSpec, keep: set[str]) -> PermutationSpec:
    """``spec`` with every group outside ``keep`` frozen (its expressions become fixed)."""
    def freeze(e):
        if not e or "fixed" in e:
            return e
        if "g" in e:
            return e if e["g"] in keep else {"fixed": spec.group_sizes[e["g"]]}
        kind, parts = next(iter(e.items()))
        return {kind: [freeze(p) for p in parts]}

    axes = {k: [freeze(e) for e in ex] for k, ex in spec.axes.items()}
    from ..spec import ModuleGroup
    modules = [ModuleGroup(m.axis, m.prefixes, tuple(f for f in m.local if f[0] in keep))
               for m in spec.modules if m.axis in keep]  # an expert axis moves its modules, alone too
    return PermutationSpec.from_axes(axes, {g: s for g, s in spec.group_sizes.items() if g in keep},
                                     spec.pinned, spec.shapes, spec.unsupported, modules=modules)


def culprit_groups(model, spec: PermutationSpec, x, tol: float = TOLERANCE, limit: int = 3,
                   budget_s: float = 60.0) -> list[str]:
    """Groups whose permutation alone changes the outputs (at most ``limit``, within ``budget_s``)."""
    bad, t0 = [], time.perf_counter()
    for g in spec.group_sizes:
        if len(bad) >= limit or time.perf_counter() - t0 > budget_s:
            break
        if check_invariance(model, _only_groups(spec, {g}), x) > tol:
            bad.append(g)
    return bad


def _describe_group(spec: PermutationSpec, g: str) -> str:
    members = spec.group(g).members
    where = ", ".join(f"{m.key}:{m.axis}" for m in members[:3]) + (" ..." if len(members) > 3 else "")
    return f"{g} (size {spec.group_sizes[g]}; {where})"


def planted_weight_matching(spec: PermutationSpec, state: dict, seed: int = 1) -> str:
    """Plant a random permutation in a copy of ``state``; ``"recovered"`` if weight matching undoes it."""
    from ..matching import weight_matching

    b = apply_permutation(spec, random_permutation(spec, seed), state)
    found = weight_matching(spec, state, b, progress=False)
    return _compare(apply_permutation(spec, found, b), state)


def planted_activation_matching(spec: PermutationSpec, model: torch.nn.Module, x, seed: int = 1) -> str:
    """Plant a random permutation in a copy of ``model``; ``"recovered"`` if activation matching undoes it."""
    import copy

    from ..matching import activation_matching

    state = model.state_dict()
    b = copy.deepcopy(model)
    load_state_(b, apply_permutation(spec, random_permutation(spec, seed), state))
    found = activation_matching(spec, model, b, [x], progress=False)
    return _compare(apply_permutation(spec, found, b.state_dict()), state)


def _compare(aligned: dict, state: dict) -> str:
    wrong = [k for k in state if state[k].is_floating_point() and not torch.equal(aligned[k], state[k])]
    return "recovered" if not wrong else f"{len(wrong)} tensors differ after alignment, first {wrong[0]}"


def check_model(entry: ZooEntry | str, *, seed: int = 0, tol: float = TOLERANCE, planted: bool = False,
                locate: bool = True) -> ZooRecord:
    """Run every check on one model and return its record; never raises for a model's own failure.

    Stages: build; trace and infer the spec (``infer_spec``); at least one group; invariance in
    eval mode and, with BatchNorm, in train mode (relative output change at most ``tol``); with
    ``planted``, weight matching (and activation matching) must undo a planted permutation.
    A failing invariance check names the groups whose permutation alone changes the outputs.
    """
    entry = ZooEntry(entry) if isinstance(entry, str) else entry
    rec = ZooRecord(entry.name, entry.family)
    t0 = time.perf_counter()
    try:
        _run_stages(entry, rec, seed, tol, planted, locate)
    except Exception as e:  # noqa: BLE001 - a model's failure is a record, not a crash of the run
        rec.status, rec.reason = "error", f"{type(e).__name__}: {_one_line(e)}"
    rec.time_s = round(time.perf_counter() - t0, 2)
    return rec


def invariance_errors(model: torch.nn.Module, spec: PermutationSpec, x, seed: int = 0) -> tuple[float, float | None]:
    """``(eval error, train error)`` of a random permutation of every group; train is None without BatchNorm."""
    ev = check_invariance(model.eval(), spec, x, seed=seed)
    if not has_batchnorm(model):
        return ev, None
    try:
        return ev, check_invariance(model.train(), spec, x, seed=seed)
    finally:
        model.eval()


def float64_errors(model: torch.nn.Module, spec: PermutationSpec, x, seed: int = 0) -> tuple[float, float | None]:
    """:func:`invariance_errors` on a float64 copy of the model and inputs.

    Deep nets in train mode (BatchNorm over a batch of 2) amplify float32 round-off past the
    tolerance; in float64 a sound spec stays near 1e-12 while a wrong permutation still changes
    the outputs by order one, so this tells round-off from a wrong spec.
    """
    return invariance_errors(float64_model(model), spec, float64_inputs(x), seed)


def noise_floor(model: torch.nn.Module, x, seed: int = 0, draws: int = 2) -> float:
    """How much the outputs move when every weight moves by one machine epsilon (relative), in the
    model's current mode: the round-off a check of this model cannot see below. Largest of ``draws``.

    ``model`` is not modified (copies are perturbed).
    """
    import copy

    from ..check import relative_difference

    gen = torch.Generator().manual_seed(seed)
    args = x if isinstance(x, tuple) else (x,)
    worst = 0.0
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ref = model(*args)
        for _ in range(draws):
            b = roundoff_perturb_(copy.deepcopy(model), generator=gen)
            torch.manual_seed(seed)
            worst = max(worst, relative_difference(ref, b(*args)))
    return worst


def invariance_holds(model, spec: PermutationSpec, x, errors, tol: float = TOLERANCE,
                     seed: int = 0) -> tuple[bool, float | None, str]:
    """Whether :func:`invariance_errors` ``errors`` show a sound spec; the float64 error (None when
    float32 sufficed); and how it was decided. In order:

    1. every error at most ``tol``;
    2. in float64 (:func:`float64_errors`), at most ``TOLERANCE_FLOAT64``, or at most ``tol``:
       the float64 change bounds what a wrong spec could change, at the float32 check's own bound
       (some models compute parts in float32 whatever their dtype, such as timm's EfficientViT
       attention, and some amplify round-off by 1e7 with random weights);
    3. train mode only, eval mode having passed: the float32 train error within ``FLOOR_FACTOR``
       times the model's :func:`noise_floor` in train mode (BatchNorm over a batch of 2 can make
       one-epsilon weight changes move the outputs by 1e-3). The spec is the same in both modes,
       so eval mode has already bounded a wrong permutation."""
    if max(e for e in errors if e is not None) <= tol:
        return True, None, "float32"
    e64 = max(e for e in float64_errors(model, spec, x, seed) if e is not None)
    if e64 <= TOLERANCE_FLOAT64:
        return True, e64, "float64"
    if e64 <= tol:
        return True, e64, f"float64 at most {tol:g}"
    ev, tr = errors
    if tr is not None and ev <= tol:
        model.train()
        try:
            floor = noise_floor(model, x, seed)
        finally:
            model.eval()
        if tr <= FLOOR_FACTOR * floor:
            return True, e64, f"train-mode round-off floor {floor:.1e}"
    return False, e64, "failed"


def invariance_reason(model, spec: PermutationSpec, x, errors, tol: float = TOLERANCE, locate: bool = True) -> str:
    """Why the invariance check failed: the error, the mode, and the groups that change outputs alone."""
    ev, tr = errors
    mode = "train" if tr is not None and tr > tol >= ev else "eval"
    model.train(mode == "train")
    try:
        bad = culprit_groups(model, spec, x, tol) if locate else []
    finally:
        model.eval()
    worst = max(e for e in errors if e is not None)
    params = {k for k, _ in model.named_parameters()}
    unused = sorted({p.key for p in spec.pinned if p.reason.startswith("not used by the traced graph")} & params)
    why = (f"; {len(unused)} parameters unused by the traced graphs ({', '.join(unused[:2])} ...) run in train mode: "
           "train-only modules read permuted channels (train mode did not trace)"
           if unused and mode == "train" else "")
    return (f"outputs change by {worst:.2g} ({mode})" + why +
            ("; groups that change them alone: " + "; ".join(_describe_group(spec, g) for g in bad) if bad else ""))


def _run_stages(entry, rec, seed, tol, planted, locate):
    rec.stage = "build"
    model, x = build(entry, seed)
    rec.params = sum(p.numel() for p in model.parameters())
    rec.input_shape = [list(t.shape) for t in (x if isinstance(x, tuple) else (x,))]
    rec.stage = "trace"
    t = time.perf_counter()
    try:
        spec = infer_spec(model, x)
    except TraceError as e:
        rec.reason = _one_line(e)
        return
    rec.infer_s = round(time.perf_counter() - t, 2)
    rec.traced = True
    rec.groups, rec.units = len(spec.group_sizes), spec.num_units
    rec.per_block, rec.per = len(spec.per), dict(spec.per)
    rec.permuted_fraction = round(spec.permuted_fraction(), 4)
    rec.pins, rec.unsupported = pin_kinds(spec), list(spec.unsupported)
    rec.pinned = [f"{p.key}:{p.axis} ({p.size}) {p.reason}" for p in spec.pinned]
    rec.status, rec.stage = "fail", "groups"
    if not spec.group_sizes:
        rec.reason = "no permutation group" + (f"; unsupported: {spec.unsupported[0]}" if spec.unsupported else "")
        return
    rec.stage = "invariance"
    errors = invariance_errors(model, spec, x, seed)
    rec.error_eval, rec.error_train = errors
    ok, rec.error_float64, basis = invariance_holds(model, spec, x, errors, tol, seed)
    if not ok:
        rec.reason = invariance_reason(model, spec, x, errors, tol, locate) + (
            f"; float64 {rec.error_float64:.1e}" if rec.error_float64 is not None else "")
        return
    if rec.error_float64 is not None:
        rec.reason = (f"float32 round-off {max(e for e in errors if e is not None):.1e}; float64 {rec.error_float64:.1e}"
                      + ("" if basis == "float64" else f"; decided by {basis}"))
    if planted:
        rec.stage = "planted"
        rec.planted["weight"] = planted_weight_matching(spec, model.state_dict(), seed + 1)
        rec.planted["activation"] = planted_activation_matching(spec, model, x, seed + 1)
        bad = {k: v for k, v in rec.planted.items() if v != "recovered"}
        if bad:
            rec.reason = "; ".join(f"{k} matching: {v}" for k, v in bad.items())
            return
    rec.status, rec.stage = "pass", ""


def _one_line(e: BaseException, limit: int = 400) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."

