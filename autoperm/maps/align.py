"""An alignment that carries a permutation and a continuous transform, and applying it to B's state.

>>> import torch
>>> from autoperm import PermutationSpec
>>> from autoperm.maps import Map, Site, random_transform, apply_transform
>>> m = Map("h", "orthogonal", 3, sites=(Site("w1", 0, "primal"), Site("w2", 1, "dual")))
>>> spec = PermutationSpec.from_axes({}, {}, maps=[m])
>>> a = {"w1": torch.randn(3, 5, dtype=torch.float64), "w2": torch.randn(4, 3, dtype=torch.float64)}
>>> b = apply_transform(spec, random_transform(spec, seed=1), a)
>>> from autoperm import weight_matching
>>> result = weight_matching(spec, a, b, kinds=("orthogonal",))
>>> aligned = align_state(spec, a, b, result)
>>> all(torch.allclose(aligned[k], a[k], atol=1e-10) for k in a)
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..permutation import Permutation, apply_permutation
from ..spec import PermutationSpec
from .element import Transform, apply_transform, fold_norms, maps_of, unfold_norms

__all__ = ["Alignment", "align_state"]


@dataclass
class Alignment:
    """What matching with continuous symmetries returns: ``permutation`` acts first, then ``transform``
    (``{map name: value}``; the maps it names had their norms folded into their readers).

    ``kinds``: the kinds that were matched; ``objective``: ``-Σ |A - aligned B|²`` over the matched
    tensors (norms folded), once per round of the descent."""

    permutation: Permutation
    transform: Transform
    kinds: tuple = ()
    objective: list = field(default_factory=list)


def align_state(spec: PermutationSpec, state_a: Mapping, state_b: Mapping, alignment) -> dict:
    """B aligned to A: ``state_b``'s norms folded, the permutation applied, then the transform, then the
    norms unfolded with ``state_a``'s scales and shifts, so the result has A's norm parameters, B's
    function and B's architecture (it loads into the same class), and averages sensibly with A.

    ``alignment`` may also be a plain permutation (then this is ``apply_permutation``). Inputs are not
    modified.

    Raises:
        ValueError: the transform names a map the spec does not have, or a norm of A has a zero scale.
    """
    if not isinstance(alignment, Alignment):
        return apply_permutation(spec, alignment, state_b)
    known = {m.name: m for m in maps_of(spec)}
    unknown = [k for k in alignment.transform if k not in known]
    if unknown:
        raise ValueError(f"the alignment has values for maps the spec does not have: {unknown}")
    maps = [known[k] for k in alignment.transform]
    folded = fold_norms(maps, state_b)
    moved = apply_transform(maps, alignment.transform, apply_permutation(spec, alignment.permutation, folded))
    return unfold_norms(maps, moved, state_a)
