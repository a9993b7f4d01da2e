"""Continuous symmetries beyond permutations: rotations, orthogonal and invertible maps, positive scalings.

``map`` says where each acts (:class:`Map`, :class:`Site`, :class:`Fold`); ``element`` makes and applies
elements (:class:`Transform`); ``infer`` finds them in a traced graph (:func:`infer_maps`), with one rule per
op in ``rules``; ``align`` applies what matching finds (:class:`Alignment`, :func:`align_state`).
"""
from .element import (
    Transform, apply_transform, fold_norms, identity_transform, maps_of, random_transform, transform_matrices,
    unfold_norms,
)
from .check import check_symmetries
from .align import Alignment, align_state
from .infer import DEFAULT_KINDS, infer_maps
from .map import KINDS, ROLES, Fold, Map, MapPin, Site

__all__ = ["Map", "Site", "Fold", "MapPin", "KINDS", "ROLES", "Transform", "random_transform", "identity_transform",
           "apply_transform", "transform_matrices", "fold_norms", "unfold_norms", "maps_of", "check_symmetries",
           "infer_maps", "DEFAULT_KINDS", "Alignment", "align_state"]
