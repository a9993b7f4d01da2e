"""Atoms: abstract permutable index sets, tied by union-find and refined on demand.

Every tensor axis in the analysed graph carries one atom. Rules tie atoms
(``union``), pin them (``pin``) or ask for structure: an atom can be refined
into a concatenation (``as_cat``) or a row-major product (``as_prod``) of
smaller atoms. Each operation only ever *restricts* the set of permutations
an atom may take, so any sequence of them is sound; when two structures
cannot be reconciled the atoms are pinned with the reason.

The permutation of an atom refined as ``cat[a, b]`` is the block-diagonal
``perm(a) ⊕ perm(b)``; of ``prod[a, b]`` the Kronecker ``perm(a) ⊗ perm(b)``
(index ``i * |b| + j`` maps to ``perm(a)[i] * |b| + perm(b)[j]``).

A tensor's *layout* is one atom per axis (``Layout``); a ``Stacked`` layout gives each slice
of one axis its own atoms (fused qkv). Both live here, beside the atoms, so the engine and the
rules share them without importing each other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from networkx.utils import UnionFind

__all__ = ["AtomTable", "Layout", "Stacked"]

Layout = tuple  # tuple[int, ...]: one atom per axis of a tensor


@dataclass
class _Root:
    size: int
    kind: str | None = None  # None (leaf), "cat" or "prod"
    children: list[int] = field(default_factory=list)
    pinned: str | None = None


class AtomTable:
    """Union-find over atoms with refinement and pinning."""

    def __init__(self):
        self._uf = UnionFind()
        self._info: dict[int, _Root] = {}

    # -- creation ---------------------------------------------------------
    def fresh(self, size: int, pinned: str | None = None) -> int:
        a = len(self._info)
        self._info[a] = _Root(int(size), pinned=pinned if size > 1 else None)
        self._uf[a]
        return a

    def composite(self, kind: str, children: list[int]) -> int:
        """A new atom defined as ``kind`` (cat or prod) of existing atoms."""
        children = [c for c in children if self.size(c) > 1] if kind == "prod" else [c for c in children if self.size(c) > 0]
        if len(children) == 1:
            return children[0]
        sizes = [self.size(c) for c in children]
        a = self.fresh(math.prod(sizes) if kind == "prod" else sum(sizes))
        if self.size(a) > 1:
            self._info[a].kind, self._info[a].children = kind, list(children)
        return a

    # -- queries ----------------------------------------------------------
    def find(self, a: int) -> int:
        return self._uf[a]

    def root(self, a: int) -> _Root:
        return self._info[self._uf[a]]

    def size(self, a: int) -> int:
        return self._info[a].size

    def pinned(self, a: int) -> str | None:
        return self.root(a).pinned

    def factors(self, a: int) -> list[int]:
        """Flattened row-major factors of ``a`` (size-1 factors dropped)."""
        r = self.root(a)
        if r.kind != "prod":
            return [self.find(a)] if r.size > 1 else []
        return [f for c in r.children for f in self.factors(c)]

    def segments(self, a: int) -> list[int]:
        """Flattened concatenation segments of ``a`` (empty ones dropped)."""
        r = self.root(a)
        if r.kind != "cat":
            return [self.find(a)] if r.size > 0 else []
        return [s for c in r.children for s in self.segments(c)]

    # -- pinning ----------------------------------------------------------
    def pin(self, a: int, reason: str) -> None:
        r = self.root(a)
        if r.size <= 1:
            return
        if r.pinned is None:
            r.pinned = reason
        for c in r.children:
            self.pin(c, reason)

    # -- refinement -------------------------------------------------------
    def _refine(self, a: int, kind: str, sizes: list[int]) -> list[int]:
        r = self.root(a)
        kids = [self.fresh(s, pinned=r.pinned) for s in sizes]
        r.kind, r.children = kind, kids
        return kids

    def as_prod(self, a: int, sizes: list[int], where: str = "a reshape") -> list[int] | None:
        """Atoms ``x_i`` of the given sizes with ``a == prod[x_i]``, refining as needed; None if impossible.

        A concatenation whose every segment is a multiple of the inner size ``m = prod(sizes[1:])``
        factors too: ``cat[s_k]`` with ``s_k = prod[h_k, f_k]`` is ``prod[cat[h_k], f]`` once the
        inner atoms ``f_k`` are tied (``(⊕ π_k) ⊗ σ`` restricts ``⊕ (π_k ⊗ σ_k)``).
        """
        sizes = list(sizes)
        if math.prod(sizes) != self.size(a):
            return None
        real = [s for s in sizes if s > 1]
        r = self.root(a)
        if len(real) <= 1:
            kids = [self.find(a)] if real else []
        elif r.kind is None:
            kids = self._refine(a, "prod", real)
        elif r.kind == "cat":
            inner = math.prod(real[1:])
            segs = self.segments(a)
            if any(self.size(s) % inner for s in segs):
                return None
            per = [self.as_prod(s, [self.size(s) // inner] + real[1:], where) for s in segs]
            if any(p is None for p in per):
                return None
            for p in per[1:]:
                for x, y in zip(per[0][1:], p[1:]):
                    self.union(x, y, where)
            kids = [self.composite("cat", [p[0] for p in per])] + per[0][1:]
        else:
            facs = self.factors(a)
            common = _common_factors([self.size(f) for f in facs], real)
            if common is None:
                return None
            fine, k = [], 0
            for f in facs:
                share, p = [], 1
                while p < self.size(f):
                    share.append(common[k]); p *= common[k]; k += 1
                sub = [f] if len(share) == 1 else self.as_prod(f, share, where)
                if sub is None:
                    return None
                fine.extend(sub)
            kids, k = [], 0
            for s in real:
                grp, p = [], 1
                while p < s:
                    grp.append(fine[k]); p *= self.size(fine[k]); k += 1
                kids.append(self.composite("prod", grp))
        it = iter(kids)
        return [next(it) if s > 1 else self.fresh(1) for s in sizes]

    def as_cat(self, a: int, sizes: list[int]) -> list[int] | None:
        """Atoms ``x_i`` of the given sizes with ``a == cat[x_i]``, refining as needed; None if impossible."""
        sizes = list(sizes)
        if sum(sizes) != self.size(a):
            return None
        nonzero = [s for s in sizes if s > 0]
        if len(nonzero) == 1:
            return [self.find(a) if s > 0 else self.fresh(0) for s in sizes]
        r = self.root(a)
        if r.kind is None:
            kids = iter(self._refine(a, "cat", nonzero))
            return [next(kids) if s > 0 else self.fresh(0) for s in sizes]
        if r.kind == "prod":
            facs = self.factors(a)
            head, inner = facs[0], math.prod(self.size(f) for f in facs[1:])
            if any(s % inner for s in sizes):
                return None
            pieces = self.as_cat(head, [s // inner for s in sizes])
            if pieces is None:
                return None
            return [self.composite("prod", [p] + facs[1:]) if s > 0 else self.fresh(0) for p, s in zip(pieces, sizes)]
        segs = self.segments(a)
        bounds = _cumsum([self.size(s) for s in segs])
        want = _cumsum(sizes)
        cuts = sorted(set(bounds) | set(want))
        fine: list[int] = []
        for s, lo, hi in zip(segs, [0] + bounds[:-1], bounds):
            inner = [c for c in cuts if lo < c < hi]
            if inner:
                sub = self.as_cat(s, _diff([lo] + inner + [hi]))
                if sub is None:
                    return None
                fine.extend(sub)
            else:
                fine.append(s)
        fb = _cumsum([self.size(f) for f in fine])
        out, k = [], 0
        for w in want:
            group = []
            while k < len(fine) and fb[k] <= w:
                group.append(fine[k]); k += 1
            out.append(self.composite("cat", group) if group else self.fresh(0))
        return out

    # -- union ------------------------------------------------------------
    def union(self, a: int, b: int, where: str) -> None:
        """Tie ``a`` and ``b`` to one permutation; pins both (with ``where``) if their structures clash."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ia, ib = self._info[ra], self._info[rb]
        if ia.size != ib.size:
            raise ValueError(f"size mismatch {ia.size} != {ib.size} at {where}")
        if ia.size <= 1:
            return
        if ia.kind is None or ib.kind is None:
            keep = ia if ia.kind is not None else ib
            pinned = ia.pinned or ib.pinned
            self._uf.union(ra, rb)
            new = self.find(ra)
            self._info[new] = _Root(keep.size, keep.kind, keep.children, None)
            if pinned:
                self.pin(new, pinned)
            return
        pinned = ia.pinned or ib.pinned
        if ia.kind == ib.kind == "prod":
            fa, fb = self.factors(ra), self.factors(rb)
            common = _common_factors([self.size(f) for f in fa], [self.size(f) for f in fb])
            xa = self.as_prod(ra, common, where) if common else None
            xb = self.as_prod(rb, common, where) if common else None
        elif ia.kind == ib.kind == "cat":
            sa, sb = self.segments(ra), self.segments(rb)
            cuts = sorted(set(_cumsum([self.size(s) for s in sa])) | set(_cumsum([self.size(s) for s in sb])))
            common = _diff([0] + cuts)
            xa, xb = self.as_cat(ra, common), self.as_cat(rb, common)
        else:
            cat, prod = (ra, rb) if ia.kind == "cat" else (rb, ra)
            sizes = [self.size(s) for s in self.segments(cat)]
            xc, xp = self.segments(cat), self.as_cat(prod, sizes)
            xa, xb = (xc, xp) if cat == ra else (xp, xc)
        if xa is None or xb is None:
            self.pin(ra, f"incompatible channel structures meet at {where}")
            self.pin(rb, f"incompatible channel structures meet at {where}")
            self._uf.union(ra, rb)
            self._info[self.find(ra)] = ia if self.find(ra) == ra else ib
            return
        self._uf.union(ra, rb)
        new = self.find(ra)
        self._info[new] = ia if new == ra else ib
        for x, y in zip(xa, xb):
            self.union(x, y, where)
        if pinned:
            self.pin(new, pinned)


def _cumsum(xs):
    out, t = [], 0
    for x in xs:
        t += x
        out.append(t)
    return out


def _diff(bounds):
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _common_factors(a: list[int], b: list[int]) -> list[int] | None:
    """Sizes of the coarsest common row-major refinement of two factorizations, or None."""
    pa, pb = set(), set()
    t = 1
    for x in a:
        t *= x; pa.add(t)
    t = 1
    for x in b:
        t *= x; pb.add(t)
    pts = sorted(pa | pb)
    prev, out = 1, []
    for p in pts:
        if p % prev:
            return None
        out.append(p // prev)
        prev = p
    return out


class Stacked:
    """A tensor whose slices along ``axis`` carry different atoms on the other axes (``parts[i]``).

    Made by a reshape that splits a fused axis into (k, ...) when the k slices are later taken
    apart by unbind/select (fused qkv): each slice keeps its own permutations. Rules that do not
    ask for the stacked form see the parts tied together, which is the plain (coarser) answer.
    """

    def __init__(self, axis: int, parts: list[Layout]):
        self.axis, self.parts, self.collapsed = axis, parts, False
