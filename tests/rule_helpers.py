"""Helpers shared by the rule tests (a module of its own: ``conftest`` names clash across test folders)."""
import torch

import autoperm


def tied_sets(spec):
    """Groups as a set of frozensets of (key, axis): order-independent comparison of groupings."""
    return {frozenset((m.key, m.axis) for m in g.members) for g in spec.groups}


def spec_and_error(model, x, seed=0, train=False):
    """Infer a spec on a randomized copy of ``model`` and return (spec, invariance error)."""
    torch.manual_seed(seed)
    autoperm.randomize_(model, seed)
    model.eval()
    spec = autoperm.infer_spec(model, x)
    model.train(train)
    err = autoperm.check_invariance(model, spec, x, seed=seed)
    return spec, err
