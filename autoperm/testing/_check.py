"""The checks run on every generated architecture: sound, complete, planted permutation recovered."""
from __future__ import annotations

import torch

from .._infer import analyse
from ..check import check_invariance, randomize_
from ..permutation import apply_permutation, random_permutation
from ._arch import Architecture, Chooser, generate

__all__ = ["FuzzFailure", "check_architecture", "architectures"]

TOL = 1e-8  # relative output difference allowed in float64 (round-off is about 1e-15)
# Float64 outputs no larger than this are zero up to round-off (instance norm then a mean over the
# same axis): no permutation can change them, and their relative change measures round-off only.
DEGENERATE = 1e-10
RANDOM_STARTS = 16  # then this many random starting permutations
RESTARTS = 8  # weight matching is coordinate descent: a single visiting order can stall on tiny random nets


class FuzzFailure(AssertionError):
    """A generated architecture broke a promise; ``stage`` says which, ``arch`` reproduces it."""

    def __init__(self, stage: str, arch: Architecture, detail: str):
        self.stage, self.arch, self.detail = stage, arch, detail
        super().__init__(f"[{stage}] {detail}\n  architecture: {arch.description}")


MAP_KINDS = ("orthogonal", "invertible", "rotary", "scale")


def check_architecture(arch: Architecture, *, tol: float = TOL, matching: bool = True, seed: int = 0,
                       maps: bool = True) -> dict:
    """Run every check on ``arch``; raise :class:`FuzzFailure` on the first broken one.

    1. ``randomize_`` the model and ``infer_spec`` on its inputs (must not raise);
    2. completeness: every (key, axis) the generator knows to be a free hidden axis carries a group;
    3. soundness: ``check_invariance`` in eval mode, and in train mode when the model has
       BatchNorm-like statistics, is at most ``tol`` (relative, float64); a mode whose outputs are
       zero up to round-off (at most ``DEGENERATE``) is skipped and marked ``degenerate``;
    4. a planted random permutation of the weights is undone by ``weight_matching`` (the aligned
       state dict equals the original), when ``matching``;
    5. when ``maps``, continuous symmetries are inferred from the same analysis (every kind) and, for
       each inferred kind, ``check_symmetries`` (a random permutation, then a random element of every
       map of that kind; then of all maps at once) is at most ``tol`` in eval mode.

    Returns a report: the number of groups, units and pins, and the invariance errors.
    """
    model = arch.model
    randomize_(model, seed)
    model.eval()
    try:
        ctx, tms, spec = analyse(model, arch.inputs)  # what infer_spec runs, with its analysis for the maps
    except Exception as e:  # noqa: BLE001 - any exception is a failure of the promise
        raise FuzzFailure("infer", arch, f"{type(e).__name__}: {e}") from e
    for key, axis in arch.permuted:
        if spec.axes.get(key, [None] * (axis + 1))[axis] is None:
            why = [p.reason for p in spec.pinned if p.key == key and p.axis == axis]
            raise FuzzFailure("complete", arch, f"{key}:{axis} is a free hidden axis but has no group; pins: {why}")
    report = {"groups": len(spec.group_sizes), "units": spec.num_units, "pins": len(spec.pinned),
              "unsupported": len(spec.unsupported)}
    modes = ["eval"] + (["train"] if arch.train_check else [])
    for mode in modes:
        model.train(mode == "train")
        if _output_scale(model, arch.inputs) <= DEGENERATE:
            report["degenerate" if mode == "eval" else "degenerate_train"] = True
            continue
        for s in (seed, seed + 1):
            err = check_invariance(model, spec, arch.inputs, seed=s)
            if not err <= tol:
                raise FuzzFailure(f"invariance-{mode}", arch, f"relative output difference {err:.3g} > {tol:g} "
                                  f"(permutation seed {s}); groups {spec.group_sizes}")
            report["invariance" if mode == "eval" else "invariance_train"] = max(
                err, report.get("invariance" if mode == "eval" else "invariance_train", 0.0))
    model.eval()
    if maps:
        report.update(_check_maps(arch, ctx, tms, spec, tol, seed))
    if matching and spec.group_sizes:
        report["planted"] = _planted(arch, spec, seed)
    return report


def _check_maps(arch: Architecture, ctx, tms, spec, tol: float, seed: int) -> dict:
    from ..maps import check_symmetries
    from ..maps.infer import maps_from_analysis

    try:
        full = maps_from_analysis(ctx, tms, spec, MAP_KINDS)
    except Exception as e:  # noqa: BLE001 - any exception is a failure of the promise
        raise FuzzFailure("maps-infer", arch, f"{type(e).__name__}: {e}") from e
    kinds = sorted({m.kind for m in full.maps})
    out = {"maps": {k: sum(m.kind == k for m in full.maps) for k in kinds}, "map_pins": len(full.map_pins)}
    if _output_scale(arch.model, arch.inputs) <= DEGENERATE:
        return out
    for kind in kinds + (["all"] if len(kinds) > 1 else []):
        err = check_symmetries(arch.model, full, arch.inputs, seed=seed + 3, kinds=None if kind == "all" else (kind,))
        if not err <= tol:
            raise FuzzFailure(f"maps-{kind}", arch, f"relative output difference {err:.3g} > {tol:g} under random "
                              f"{kind} maps; maps {[(m.name, m.kind, m.blocks, m.size) for m in full.maps]}")
        out["map_invariance"] = max(err, out.get("map_invariance", 0.0))
    return out


def _planted(arch: Architecture, spec, seed: int) -> str:
    """Plant a random permutation in a copy of the weights and undo it with ``weight_matching``.

    Returns ``"recovered"`` when ``weight_matching(restarts=RESTARTS)`` aligns the copy back exactly,
    ``"recovered-after-random-starts"`` when only a random starting permutation (its public ``init``)
    reached it because coordinate descent stalled in a local optimum of lower objective, and
    ``"stalled"`` when every start stalled so (a limit of the search, not a wrong answer: the planted
    optimum scores higher and is a fixed point). Raises when the planted optimum is not a fixed point
    of the descent, or when a wrong answer scores at least as high as the planted optimum (the costs
    or the spec would then be wrong).
    """
    from ..matching import weight_matching
    from ..matching._costs import objective
    from ..permutation import inverse_permutation

    a = {k: v.clone() for k, v in arch.model.state_dict().items()}
    planted = random_permutation(spec, seed + 7)
    b = apply_permutation(spec, planted, a)
    truth = inverse_permutation(planted)
    best = objective(spec, a, b, truth)

    def aligned(found) -> bool:
        out = apply_permutation(spec, found, b)
        return all(torch.allclose(out[k], a[k], rtol=0, atol=1e-12) for k in a)

    def fail(found, why):
        wrong = {g: (found[g].tolist(), truth[g].tolist()) for g in spec.group_sizes
                 if not torch.equal(found[g], truth[g])}
        raise FuzzFailure("planted", arch, f"{why}; groups (found, planted): {dict(list(wrong.items())[:3])}")

    stay = weight_matching(spec, a, b, init=truth, progress=False)
    if not aligned(stay):
        fail(stay, "weight_matching moves away from the planted optimum")
    found = weight_matching(spec, a, b, seed=seed, restarts=RESTARTS, progress=False)
    for start in range(RANDOM_STARTS + 1):
        if start:
            found = weight_matching(spec, a, b, seed=seed, init=random_permutation(spec, 1000 + start),
                                    progress=False)
        if aligned(found):
            return "recovered" if start == 0 else "recovered-after-random-starts"
        if objective(spec, a, b, found) >= best - 1e-9 * abs(best):
            fail(found, "a wrong permutation scores as high as the planted one")
    return "stalled"  # every start ended in a local optimum of lower objective than the planted one


class _HypothesisChooser(Chooser):
    def __init__(self, draw):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))


def architectures(max_blocks: int = 5):
    """A hypothesis strategy of :class:`Architecture` (needs the ``hypothesis`` package)."""
    from hypothesis import strategies as st

    @st.composite
    def _arch(draw):
        return generate(_HypothesisChooser(draw), seed=None, max_blocks=max_blocks)

    return _arch()


@torch.no_grad()
def _output_scale(model, inputs) -> float:
    """The largest magnitude among the model's floating-point outputs on ``inputs``."""
    from ..check import _tensors

    out = model(*inputs)
    return max((float(t.abs().max()) for t in _tensors(out) if t.is_floating_point() and t.numel()), default=0.0)
