"""Groups independent per block (spec format version 2): apply, compose, invert, serialise."""
import json

import pytest
import torch

from autoperm import PermutationSpec
from autoperm.io import permutation_from_dict, permutation_to_dict
from autoperm.permutation import (apply_permutation, compose_permutations, identity_permutation,
                                  inverse_permutation, random_permutation, validate_permutation)

H, D, C = 3, 4, 5


class Heads(torch.nn.Module):
    """x -> per-head hidden (H x D, element-wise nonlinearity) -> out; any permutation of the hidden units is exact."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(C, H * D)
        self.b = torch.nn.Linear(H * D, C)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Experts(torch.nn.Module):
    """Fused experts [E, I, C]: expert e's hidden units permute on their own (block from another axis)."""

    def __init__(self, e=3, i=4):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(e, i, C))
        self.w2 = torch.nn.Parameter(torch.randn(e, C, i))
        self.gate = torch.nn.Parameter(torch.randn(e, C))

    def forward(self, x):
        h = torch.relu(torch.einsum("eic,bc->bei", self.w1, x))
        g = torch.softmax(x @ self.gate.T, -1)
        return torch.einsum("eci,bei,be->bc", self.w2, h, g)


def _heads_spec():
    hd = {"prod": [{"g": "h"}, {"g": "d"}]}
    return PermutationSpec.from_axes({"a.weight": [hd, None], "a.bias": [hd], "b.weight": [None, hd], "b.bias": [None]},
                                     {"h": H, "d": D}, per={"d": "h"},
                                     shapes={"a.weight": [H * D, C], "a.bias": [H * D], "b.weight": [C, H * D],
                                             "b.bias": [C]})


def _experts_spec():
    return PermutationSpec.from_axes({"w1": [{"g": "e"}, {"g": "i"}, None], "w2": [{"g": "e"}, None, {"g": "i"}],
                                      "gate": [{"g": "e"}, None]}, {"e": 3, "i": 4}, per={"i": "e"})


@pytest.mark.parametrize("make,spec_fn", [(Heads, _heads_spec), (Experts, _experts_spec)])
def test_random_element_of_the_wreath_product_is_exact(make, spec_fn):
    torch.manual_seed(0)
    m, spec = make().double(), spec_fn()
    x = torch.randn(7, C, dtype=torch.double)
    y = m(x)
    perm = random_permutation(spec, seed=1)
    assert perm[next(iter(spec.per))].shape[0] > 1
    sd = apply_permutation(spec, perm, m.state_dict())
    assert any(not torch.equal(sd[k], v) for k, v in m.state_dict().items())
    m2 = make().double()
    m2.load_state_dict(sd)
    torch.testing.assert_close(m2(x), y)


@pytest.mark.parametrize("spec_fn", [_heads_spec, _experts_spec])
def test_compose_and_inverse_match_applying_in_turn(spec_fn):
    spec = spec_fn()
    sd = {k: torch.randn(*(s if s else [1])) for k, s in
          {"a.weight": [H * D, C], "a.bias": [H * D], "b.weight": [C, H * D], "b.bias": [C],
           "w1": [3, 4, C], "w2": [3, C, 4], "gate": [3, C]}.items() if k in spec.axes}
    spec.shapes.clear()
    p, q = random_permutation(spec, seed=2), random_permutation(spec, seed=3)
    both = apply_permutation(spec, q, apply_permutation(spec, p, sd))
    once = apply_permutation(spec, compose_permutations(p, q, spec), sd)
    for k in sd:
        assert torch.equal(both[k], once[k]), k
    back = apply_permutation(spec, inverse_permutation(p, spec), apply_permutation(spec, p, sd))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    ident = compose_permutations(p, inverse_permutation(p, spec), spec)
    for n, v in identity_permutation(spec).items():
        assert torch.equal(ident[n], v)


def test_the_convention_new_block_row_indexes_the_inner_permutation():
    spec = _heads_spec()
    perm = {"h": torch.tensor([2, 0, 1]), "d": torch.tensor([[1, 0, 2, 3], [0, 1, 3, 2], [3, 2, 1, 0]])}
    w = torch.arange(H * D).float()[:, None].expand(H * D, C).contiguous()
    new = apply_permutation(spec, perm, {"a.weight": w, "a.bias": torch.zeros(H * D), "b.weight": torch.zeros(C, H * D),
                                         "b.bias": torch.zeros(C)})["a.weight"][:, 0].long()
    want = [perm["h"][i] * D + perm["d"][i][j] for i in range(H) for j in range(D)]  # new[(i, j)] = old[(p[i], q[i][j])]
    assert new.tolist() == [int(v) for v in want]


def test_json_version_2_round_trip_and_version_1_still_loads():
    spec = _heads_spec()
    d = json.loads(spec.to_json())
    assert d["version"] == 2 and {"name": "d", "size": D, "per": "h"} in d["groups"]
    assert PermutationSpec.from_json(spec.to_json()) == spec
    plain = PermutationSpec.from_axes({"w": [{"g": "h"}]}, {"h": 2})
    assert json.loads(plain.to_json())["version"] == 1
    assert PermutationSpec.from_json(plain.to_json()) == plain
    d["version"] = 1
    with pytest.raises(ValueError, match="version-1"):
        PermutationSpec.from_json(json.dumps(d))
    perm = random_permutation(spec, seed=0)
    back = permutation_from_dict(json.loads(json.dumps(permutation_to_dict(perm))))
    assert all(torch.equal(back[n], perm[n]) for n in perm) and back.per == perm.per == {"d": "h"}


def test_bad_per_declarations_and_permutations_name_the_group():
    with pytest.raises(ValueError, match="'d'"):  # d appears without its block group
        PermutationSpec.from_axes({"w": [{"g": "d"}, None]}, {"h": 2, "d": 3}, per={"d": "h"})
    with pytest.raises(ValueError, match="nesting"):
        PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 3}, per={"d": "h", "h": "d"})
    spec = _heads_spec()
    perm = random_permutation(spec)
    perm["d"] = perm["d"][0]
    with pytest.raises(ValueError, match="'d'.*one row per block"):
        validate_permutation(spec, perm)
    perm = random_permutation(spec)
    assert torch.equal(inverse_permutation(perm)["d"], inverse_permutation(perm, spec)["d"])  # perm.per knows
    with pytest.raises(ValueError, match="pass the spec"):
        inverse_permutation(dict(perm))
    assert spec.to_axes_to_perm()[1]["a.weight"] == (None, None)


def test_the_numpy_reference_implementation_in_the_docs_agrees_for_version_2():
    import os

    import numpy as np
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "spec-format.md"), encoding="utf-8").read()
    code = next(b.split("```")[0] for b in text.split("```python")[1:] if "def apply_permutation" in b)
    ns = {}
    exec(code, ns)
    for spec, state in ((_heads_spec(), {"a.weight": torch.randn(H * D, C), "a.bias": torch.randn(H * D),
                                         "b.weight": torch.randn(C, H * D), "b.bias": torch.randn(C)}),
                        (_experts_spec(), {"w1": torch.randn(3, 4, C), "w2": torch.randn(3, C, 4),
                                           "gate": torch.randn(3, C)})):
        perm = random_permutation(spec, seed=7)
        theirs = ns["apply_permutation"](json.loads(spec.to_json()), {k: v.tolist() for k, v in perm.items()},
                                         {k: v.numpy() for k, v in state.items()})
        ours = apply_permutation(spec, perm, state)
        for k in state:
            assert np.array_equal(theirs[k], ours[k].numpy()), k
