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

__all__ = ["check_invariance", "relative_difference", "randomize_"]

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


@torch.no_grad()
def check_invariance(model: torch.nn.Module, spec: PermutationSpec, example_inputs, seed: int = 0) -> float:
    """The largest relative output difference after a random permutation of every group.

    Runs copies of ``model`` in its current mode (train or eval); ``model`` itself is not modified.
    A sound spec gives float round-off (about 1e-6 in float32).

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
    """
    args = as_tuple(example_inputs)
    params = {id(p) for p in model.parameters()}
    keys = [k for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()
            and not bool((torch.isfinite(t) if id(t) in params else ~torch.isnan(t)).all())]
    if keys:  # infinite buffers are legitimate (clamp bounds); infinite parameters are not
        raise ValueError(f"tensors with NaN or inf values: {keys[:5]}: outputs cannot show a wrong permutation")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m in (*a.modules(), *b.modules()):
        if isinstance(m, _DROPOUT):  # element-wise random masks are not permutation-equivariant
            m.eval()
    load_state_(b, apply_permutation(spec, random_permutation(spec, seed), a.state_dict()))
    with torch.random.fork_rng(devices=[]), _without_functional_dropout():
        torch.manual_seed(seed)
        try:
            ya = a(*args)
        except Exception as e:  # noqa: BLE001 - re-raised with the input shapes
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in args]
            raise ValueError(f"{type(model).__name__} fails on example inputs of shapes {shapes}: "
                             f"{type(e).__name__}: {e}") from e
    with torch.random.fork_rng(devices=[]), _without_functional_dropout():
        torch.manual_seed(seed)
        yb = b(*args)
    bad = [i for i, t in enumerate(_tensors(ya)) if t.is_floating_point() and bool(torch.isnan(t).any())]
    if bad:
        raise ValueError(f"model output {bad[0]} has NaN values: outputs cannot show a wrong permutation")
    return relative_difference(ya, yb)
