"""The invariance self-check: permute every group at random and compare outputs."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from ._load import load_state_
from ._trace import as_tuple
from .permutation import apply_permutation, random_permutation
from .spec import PermutationSpec

__all__ = ["check_invariance", "relative_difference", "randomize_", "run_outputs", "validate_finite"]

_DROPOUT = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Perturb every floating parameter and buffer in place so no symmetry hides behind an init.

    Zero-initialised heads, unit BatchNorm statistics and identical layer scales
    make many wrong permutations invisible; tests call this before checking.
    Variance-like buffers (``running_var``) stay positive.

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2); _ = torch.nn.init.zeros_(lin.bias); lin = randomize_(lin)
    >>> bool(lin.bias.abs().sum() > 0)
    True
    """
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t)
        std = float(t.float().std()) if t.numel() > 1 else 0.0
        t.add_(noise * scale * (std if std > 1e-3 else 0.1))
        if name.endswith("running_var"):
            t.abs_().add_(0.1)
    return model


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def relative_difference(a, b) -> float:
    """Largest ``max|a - b| / max|a|`` over the tensors of two (nested) outputs.

    A tensor that is zero up to round-off beside the others (``max|a|`` at most 16 machine epsilons
    of the largest output's) is measured against that largest output instead: its values are
    round-off, so its own scale would make any two runs differ by 100 %.

    >>> import torch
    >>> z = torch.zeros(2, dtype=torch.float64)
    >>> relative_difference((torch.ones(2), z), (torch.ones(2), z + 1e-9))  # against 1, not 0
    1e-09
    """
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        raise ValueError(f"outputs differ in structure: {len(ta)} vs {len(tb)} tensors")
    pairs, scales = [], []
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            raise ValueError(f"outputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        if not x.numel():
            continue
        eps = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
        x, y = x.detach().double(), y.detach().double()
        finite = x[torch.isfinite(x)]
        pairs.append((x, y, eps))
        scales.append(float(finite.abs().max()) if finite.numel() else 0.0)
    top = max(scales, default=0.0)
    worst = 0.0
    for (x, y, eps), scale in zip(pairs, scales):
        diff = torch.where(x == y, 0.0, (x - y).abs())  # equal infinities match; NaN never does
        if scale <= 16 * eps * top:
            scale = top
        d = float(diff.max()) / max(scale, 1e-12)
        worst = max(worst, d) if d == d else float("inf")
    return worst


@contextlib.contextmanager
def _without_functional_dropout():
    """``F.dropout`` and its kin as the identity: element-wise random masks (GoogLeNet's and
    Inception-v3's auxiliary heads call ``F.dropout`` in train mode) would differ between two
    runs whose channels are permuted, however sound the permutation."""
    names = ("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
    saved = {n: getattr(F, n) for n in names if hasattr(F, n)}
    try:
        for n in saved:
            setattr(F, n, lambda x, *args, **kwargs: x)
        yield
    finally:
        for n, fn in saved.items():
            setattr(F, n, fn)


def validate_finite(model: torch.nn.Module) -> None:
    """Raise ValueError naming the parameters holding NaN or inf and the buffers holding NaN.

    An infinite unit can hide a wrong permutation behind equal infinite outputs; infinite buffers
    (clamp bounds) are legitimate.
    """
    params = {id(p) for p in model.parameters()}
    keys = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()
            and not bool((torch.isfinite(t) if id(t) in params else ~torch.isnan(t)).all())]
    if keys:
        raise ValueError(f"tensors with NaN or inf values: {keys[:5]}: outputs cannot show a wrong permutation")


def run_outputs(model: torch.nn.Module, args: tuple, seed: int = 0, *, check_nan: bool = True):
    """``model(*args)`` as every check runs it: no gradients, dropout off, the random generator seeded.

    ``model`` must be a copy the caller owns (its dropout modules are put in eval mode). A model
    that fails on ``args`` raises ValueError giving their shapes; with ``check_nan``, so do NaN outputs.
    """
    for m in model.modules():
        if isinstance(m, _DROPOUT):  # element-wise random masks are not permutation-equivariant
            m.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]), _without_functional_dropout():
        torch.manual_seed(seed)
        try:
            out = model(*args)
        except Exception as e:  # noqa: BLE001 - re-raised with the input shapes
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in args]
            raise ValueError(f"{type(model).__name__} fails on example inputs of shapes {shapes}: "
                             f"{type(e).__name__}: {e}") from e
    bad = [i for i, t in enumerate(_tensors(out)) if t.is_floating_point() and bool(torch.isnan(t).any())]
    if check_nan and bad:
        raise ValueError(f"model output {bad[0]} has NaN values: outputs cannot show a wrong permutation")
    return out


@torch.no_grad()
def check_invariance(model: torch.nn.Module, spec: PermutationSpec, example_inputs, seed: int = 0) -> float:
    """The largest relative output difference after a random permutation of every group.

    Runs copies of ``model`` in its current mode (train or eval); ``model`` itself is not modified.
    A sound spec gives float round-off (about 1e-6 in float32). A bfloat16 or float16 model is
    checked on float32 copies of itself and of ``example_inputs`` (the same weight values): its own
    round-off (about 1e-3) would hide a small wrong change and exceed any float32 tolerance.
    :func:`autoperm.equivalence.invariance_verdict` decides pass or fail, with a float64 fallback.

    Raises:
        ValueError: a parameter holds NaN or inf, or a buffer NaN (named in the message: an
            infinite unit can hide a wrong permutation behind equal infinite outputs; infinite
            buffers such as clamp bounds are allowed), the outputs hold NaN,
            so no comparison could show a difference, or the model fails on ``example_inputs``
            (the message gives their shapes).

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> autoperm.check_invariance(mlp, autoperm.infer_spec(mlp, x), x) < 1e-5
    True
    >>> autoperm.check_invariance(mlp.bfloat16(), autoperm.infer_spec(mlp, x), x) < 1e-5  # on a float32 copy
    True
    """
    from ._float64 import floating_dtype, inputs_in, model_in

    args = as_tuple(example_inputs)
    validate_finite(model)
    if torch.finfo(floating_dtype(model)).bits < 32:
        a, args = model_in(model, torch.float32), as_tuple(inputs_in(args, torch.float32))
    else:
        a = copy.deepcopy(model)
    b = copy.deepcopy(a)
    load_state_(b, apply_permutation(spec, random_permutation(spec, seed), a.state_dict()))
    ya = run_outputs(a, args, seed)
    yb = run_outputs(b, args, seed, check_nan=False)
    return relative_difference(ya, yb)
