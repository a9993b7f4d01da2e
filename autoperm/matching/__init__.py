"""Matching: the permutation that aligns model B to model A, for any inferred spec.

Three matchers share one result type, a ``Permutation`` (``{group: LongTensor}``) such that
``apply_permutation(spec, perm, state_b)`` is B aligned to A:

- ``weight_matching(spec, state_a, state_b)``: permutation coordinate descent on the weights;
- ``activation_matching(spec, model_a, model_b, batches)``: correlation of hidden activations;
- ``ste_matching(spec, model_a, model_b, batches, loss_fn, steps=..., lr=...)``: the
  straight-through estimator (midpoint loss, projection by weight matching).

Weight and activation matching also take ``kinds=`` to match the spec's continuous symmetries
(``spec.maps``) with the permutations; they then return an ``autoperm.maps.Alignment``, applied
by ``autoperm.maps.align_state`` (``maps``, ``activation_maps``, ``_map_steps``).
"""
from .activation import activation_matching, activation_sites
from .ste import ste_matching
from .weight import weight_matching

__all__ = ["weight_matching", "activation_matching", "ste_matching", "activation_sites"]
