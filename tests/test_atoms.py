"""The atom table: refinement into products and concatenations, union of structures, pinning."""
from autoperm._atoms import AtomTable, _common_factors


def test_as_prod_refines_then_reuses():
    t = AtomTable()
    a = t.fresh(24)
    h, d = t.as_prod(a, [4, 6])
    assert t.as_prod(a, [4, 6]) == [t.find(h), t.find(d)]
    x, y, z = t.as_prod(a, [2, 2, 6])  # refines the head factor further
    assert t.size(x) == t.size(y) == 2 and t.find(z) == t.find(d)
    assert t.as_prod(a, [6, 4]) is None  # no common row-major refinement


def test_as_cat_cuts_and_groups_segments():
    t = AtomTable()
    a = t.fresh(10)
    p, q = t.as_cat(a, [4, 6])
    r, s = t.as_cat(a, [7, 3])  # cuts q at 3, groups [p, q0]
    assert t.size(r) == 7 and t.size(s) == 3
    assert [t.size(x) for x in t.segments(a)] == [4, 3, 3]


def test_as_cat_of_a_product_cuts_the_outer_factor():
    t = AtomTable()
    a = t.fresh(12)
    outer, inner = t.as_prod(a, [3, 4])
    pieces = t.as_cat(a, [4, 8])
    assert [t.size(p) for p in pieces] == [4, 8]
    assert t.find(t.factors(pieces[1])[-1]) == t.find(inner)
    assert t.as_cat(a, [2, 10]) is None  # cuts inside the inner factor


def test_union_of_products_with_common_refinement():
    t = AtomTable()
    a, b = t.fresh(24), t.fresh(24)
    t.as_prod(a, [4, 6])
    t.as_prod(b, [2, 12])
    t.union(a, b, "test")
    assert [t.size(f) for f in t.factors(a)] == [2, 2, 6]
    assert t.pinned(a) is None


def test_union_of_clashing_structures_pins_both_with_reason():
    t = AtomTable()
    a, b = t.fresh(24), t.fresh(24)
    t.as_prod(a, [4, 6])
    t.as_prod(b, [6, 4])
    t.union(a, b, "node_x")
    assert "node_x" in t.pinned(a) and "node_x" in t.pinned(b)


def test_pin_propagates_through_unions_and_refinements():
    t = AtomTable()
    a, b = t.fresh(6), t.fresh(6)
    x, y = t.as_cat(a, [2, 4])
    t.union(a, b, "w")
    t.pin(b, "because")
    assert t.pinned(x) == t.pinned(y) == "because"


def test_union_of_cat_with_product_pins_the_block_index():
    t = AtomTable()
    fused, q = t.fresh(12), t.fresh(4)
    blocks, inner = t.as_prod(fused, [3, 4])
    cat = t.composite("cat", [q, t.fresh(4), t.fresh(4)])
    t.union(cat, fused, "w")
    assert t.find(q) == t.find(inner)


def test_common_factors():
    assert _common_factors([4, 6], [2, 12]) == [2, 2, 6]
    assert _common_factors([4, 6], [6, 4]) is None
