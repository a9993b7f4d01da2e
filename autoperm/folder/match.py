"""Weight matching on lazy state dicts: tensors read on demand, cost products in bounded slabs.

The same coordinate descent as :func:`autoperm.weight_matching` (its seed pass, sweeps, block
steps and cost construction are reused as they are); what differs is where memory goes:

- tensors come from a :class:`~autoperm.folder.LazyState` (read when a group's cost needs
  them, kept in a bounded least-recently-used cache);
- a cost product ``A_G B_G^T`` over a large tensor is summed over slabs of its largest other axis,
  so the float32 copies never exceed ``slab_bytes`` per side (an embedding ``[vocab, d]`` is not
  converted whole);
- cost matrices are kept between visits only within ``matrix_bytes`` (default: none kept; every
  visit recomputes its products, reading its tensors again, from the cache or the files).

Peak memory (bytes), beyond the interpreter, torch, the meta model and the spec (0.8 GB for a
Llama in one process), with ``n`` the largest group and ``S = slab_bytes``::

    cache_bytes + max(4 n² + 3 S,  16 n²)

while a cost is built: the float32 cost, two float32 slabs and the stored slabs they come from
(a tensor larger than the cache is read slab by slab of rows; one that fits is read whole into the
cache); while it is solved: the float64 cost and the solver's row-reduced copy (``lap`` keeps only
``O(n)`` more). Cost matrices kept between visits (``matrix_bytes``) come on top. Llama-3.2-1B
(n = 8,192) with the defaults (256 MiB cache, 64 MiB slabs): 0.27 + 1.07 GB; Llama-3-8B
(n = 14,336): 0.27 + 3.3 GB. The models themselves never have to fit.
"""
from __future__ import annotations

import math
import random
from typing import Mapping

import torch
from tqdm.auto import tqdm

from ..matching._blocks import expand_rows, refine_blocks, shared_view
from ..matching._costs import CostCache, _gather, _rows, b_indices, build_layout, check_states, objective
from ..matching.weight import _descend, _kept, _seed
from ..permutation import with_blocks
from ..spec import PermutationSpec

__all__ = ["stream_weight_matching", "SlabCostCache"]


class SlabCostCache(CostCache):
    """:class:`CostCache` whose products over a large tensor are summed slab by slab."""

    def __init__(self, spec, state_a, state_b, dtype, keep=(), slab_bytes: int = 1 << 26):
        super().__init__(spec, state_a, state_b, dtype, keep)
        self.slab = max(1, slab_bytes // torch.empty((), dtype=dtype).element_size())

    def cost(self, name, units, perm) -> torch.Tensor:
        if name in self.keep:
            return super().cost(name, units, perm)
        cost = None
        for u in units:
            idx = b_indices(self.spec, u, perm, torch.device("cpu"))
            if self._row_slabs(u, idx):
                c = self._cost_from_rows(u, idx)
                cost = c if cost is None else cost.add_(c)
                continue
            a = self.a[u.key]
            device = a.device
            rows = _rows(u, a)
            others = [k for k in range(a.dim()) if k != u.axis]
            if not others or a.numel() <= self.slab:
                a_g = self._a(u, [None] * a.dim(), None)
                b_g = _gather(self.b[u.key], u.axis, idx, rows).to(self.dtype)
                cost = a_g @ b_g.T if cost is None else cost.addmm_(a_g, b_g.T)
                continue
            k = max(others, key=lambda j: a.shape[j])
            per = max(1, self.slab // max(1, a.numel() // a.shape[k]))
            for s in range(0, a.shape[k], per):
                r = torch.arange(s, min(s + per, a.shape[k]), device=device)
                a_s = self._a(u, [r if j == k else None for j in range(a.dim())], None)
                b_idx = list(idx)
                b_idx[k] = r if idx[k] is None else idx[k][r]
                b_s = _gather(self.b[u.key], u.axis, b_idx, rows).to(self.dtype)
                cost = a_s @ b_s.T if cost is None else cost.addmm_(a_s, b_s.T)
        return cost

    def _cost_from_rows(self, u, idx) -> torch.Tensor:
        """``A_G B_G^T`` of ``u`` from slabs of rows read from the files (neither tensor is read whole)."""
        shape = self.a.info(u.key).shape
        n_rows, width = shape[0], max(1, math.prod(shape[1:]))
        rows = shape[u.axis] if u.table is None else u.table[..., 0].numel()
        per = max(1, self.slab // width)
        cost = None
        for s in range(0, n_rows, per):
            a_idx, b_idx = [None] * len(shape), list(idx)
            if u.table is not None:
                a_idx[u.axis] = u.table.reshape(-1)
            a_s = _gather(self.a.rows(u.key, s, s + per), u.axis, a_idx, rows).to(self.dtype)
            b_s = _gather(self.b.rows(u.key, s, s + per), u.axis, b_idx, rows).to(self.dtype)
            cost = a_s @ b_s.T if cost is None else cost.addmm_(a_s, b_s.T)
        return cost

    def _row_slabs(self, u, idx) -> bool:
        """Whether ``u``'s tensors are best read slab by slab from the files: larger than the caches, first
        axis not the unit's and not permuted on the B side (a slab of rows is then one byte range)."""
        lazy = all(hasattr(s, "rows") and hasattr(s, "info") for s in (self.a, self.b))
        return (u.axis != 0 and idx[0] is None and lazy
                and self.a.info(u.key).nbytes > self.a.cache_bytes and self.b.info(u.key).nbytes > self.b.cache_bytes)


@torch.no_grad()
def stream_weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                           state_b: Mapping[str, torch.Tensor], *, max_iter: int = 100, seed: int = 0,
                           restarts: int = 1, matrix_bytes: int | None = 0, slab_bytes: int = 1 << 26,
                           progress: bool | None = None, stats: dict | None = None) -> dict:
    """:func:`autoperm.weight_matching` for state dicts read on demand (``LazyState``), in bounded memory.

    Args:
        spec, state_a, state_b, max_iter, seed, restarts, progress: as for ``weight_matching``;
            the states are any mappings (typically :class:`~autoperm.folder.LazyState`).
        matrix_bytes: memory for cost matrices kept between visits (0: none; None: what
            ``weight_matching`` keeps, half the two models' size: then the result is the same
            computation as ``weight_matching``'s).
        slab_bytes: the most float32 bytes one side of a cost product takes at a time.
        stats: filled with ``sweeps`` and ``solves`` (as ``descend_groups``).

    Returns:
        ``{group: LongTensor}``, as ``weight_matching``. Under a spec with groups per block, the descent
        runs with one inner permutation for all blocks, then block steps give each block its own
        (each step reads the tensors of one block group, e.g. one layer's attention); unlike
        ``weight_matching`` the other groups are not descended again after the block steps.

    Raises:
        ValueError: a key of ``spec.axes`` is missing, of the wrong shape, not floating point or not
            finite (the message names the key; ``state_a``/``state_b`` name the side).

    >>> import torch, autoperm
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> spec = autoperm.infer_spec(mlp, torch.randn(1, 4))
    >>> a = mlp.state_dict()
    >>> b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), a)
    >>> p = stream_weight_matching(spec, a, b, slab_bytes=16)
    >>> all(torch.equal(x, y) for x, y in zip(p.values(), autoperm.weight_matching(spec, a, b).values()))
    True
    """
    if spec.modules:
        raise NotImplementedError("streaming matching does not move whole modules (experts in a ModuleList): "
                                  "use weight_matching on the loaded state dicts")
    _check(spec, state_a=state_a, state_b=state_b)
    full, spec = spec, shared_view(spec)
    if restarts < 1 or max_iter < 0:
        raise ValueError("restarts must be >= 1 and max_iter >= 0")
    permuted = [k for k, ex in spec.axes.items() if any(ex)]
    dtype = torch.float64 if any(state_a[k].dtype == torch.float64 for k in permuted) else torch.float32
    layout = build_layout(spec, torch.device("cpu"))
    groups = [g for g in spec.group_sizes if layout.units[g]]
    if matrix_bytes is None:
        matrix_bytes = 0.5 * sum(s[k].numel() * s[k].element_size() for s in (state_a, state_b) for k in permuted)
    keep = _kept(spec, layout, _Sizes(state_a), dtype, matrix_bytes) if matrix_bytes else ()
    start = {g: torch.arange(n) for g, n in spec.group_sizes.items()}
    stats = stats if stats is not None else {}
    best, best_obj = None, None
    bar = tqdm(total=restarts * max_iter, desc="weight matching", unit="sweep", leave=False,
               disable=(None if progress is None else not progress), delay=2.0 if progress is None else 0.0)
    for restart in range(restarts):
        costs = SlabCostCache(spec, state_a, state_b, dtype, keep, slab_bytes)
        rng = random.Random(f"{seed}:{restart}")
        perm, solved = _seed(spec, layout, set(groups), costs, dict(start), rng)
        perm = _descend(spec, layout, groups, costs, perm, rng, max_iter, bar, restart, stats, solved)
        obj = objective(spec, state_a, state_b, perm) if restarts > 1 else 0.0
        if best is None or obj > best_obj:
            best, best_obj = perm, obj
    bar.close()
    perm = expand_rows(full, {g: p.cpu() for g, p in best.items()})
    for _ in range(8 if full.per else 0):  # block steps: each reads one block group's tensors (a layer's heads)
        perm, moved = refine_blocks(full, state_a, state_b, perm, set(full.per.values()))
        if not moved:
            break
    return with_blocks(perm, full)


def _check(spec: PermutationSpec, slab_bytes: int = 1 << 26, **states) -> None:
    """``check_states`` for lazy states: shapes and dtypes from the file headers, finiteness slab by slab
    of rows (no tensor is read whole, each is read once); other mappings go to ``check_states``."""
    if not all(hasattr(s, "info") and hasattr(s, "rows") for s in states.values()):
        return check_states(spec, **states)
    for name, state in states.items():
        for key, exprs in spec.axes.items():
            if key not in state:
                raise ValueError(f"{name} has no key {key!r} that the spec permutes")
            info = state.info(key)
            want = spec.shapes.get(key)
            if len(info.shape) != len(exprs) or (want is not None and list(info.shape) != list(want)):
                raise ValueError(f"{name}[{key!r}] ({info.file}) has shape {info.shape}, the spec expects "
                                 f"{tuple(want) if want is not None else f'{len(exprs)} axes'}")
            if not any(exprs) or state.source(key) != key:  # a tied key is checked as the key that holds it
                continue
            if not info.dtype.is_floating_point:
                raise ValueError(f"{name}[{key!r}] ({info.file}) must be floating point, got {info.dtype}")
            rows = info.shape[0] if info.shape else 1
            per = max(1, slab_bytes // max(1, info.nbytes // max(1, rows)))
            for start in range(0, rows, per):
                if not bool(torch.isfinite(state.rows(key, start, start + per)).all()):
                    raise ValueError(f"{name}[{key!r}] ({info.file}) has NaN or infinite values")


class _Sizes(Mapping):
    """``state[key].numel()`` without reading: the lazy state's shapes, for ``_kept``."""

    def __init__(self, state):
        self.state = state

    def __getitem__(self, key):
        info = getattr(self.state, "info", None)
        return torch.empty(info(key).shape, device="meta") if info else self.state[key]

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)
