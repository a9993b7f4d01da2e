"""autoperm: find the permutation symmetries of any PyTorch model; align and merge models.

>>> import torch, autoperm
>>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> x = torch.randn(2, 4)
>>> spec = autoperm.infer_spec(mlp, x)
>>> autoperm.check_invariance(mlp, spec, x) < 1e-5
True
"""
from ._infer import axis_graph, infer_spec
from ._load import load_state_
from ._trace import TraceError
from .barrier import (
    Curve, Repair, average_states, interpolate_states, interpolation_curve, layerwise_curves, merge_models,
    reset_bn_stats,
)
from .check import check_invariance, randomize_
from .equivalence import Verdict, invariance_verdict, same_function
from .matching import activation_matching, ste_matching, weight_matching
from .permutation import (
    Permutation, apply_permutation, compose_permutations, identity_permutation, inverse_permutation,
    permute_model_, random_permutation,
)
from .rules import register_rule
from .spec import Group, Member, PermutationSpec, Pin

__all__ = [
    "infer_spec", "axis_graph", "check_invariance", "randomize_", "same_function", "invariance_verdict", "Verdict", "register_rule", "TraceError",
    "PermutationSpec", "Group", "Member", "Pin",
    "Permutation", "random_permutation", "identity_permutation", "inverse_permutation",
    "compose_permutations", "apply_permutation", "permute_model_", "load_state_",
    "interpolation_curve", "Curve", "interpolate_states", "average_states", "reset_bn_stats", "Repair",
    "layerwise_curves", "merge_models",
    "weight_matching", "activation_matching", "ste_matching",
]
__version__ = "0.1.0"
