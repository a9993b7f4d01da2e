"""PermutationSpec: the permutation groups of a model and where each acts in its state dict.

Each state-dict axis is described by an *axis expression* (JSON-ready):

- ``{"g": name}``: the axis is permuted by group ``name``;
- ``{"fixed": n}``: ``n`` indices that never move;
- ``{"cat": [e1, e2, ...]}``: consecutive slices, each permuted by its own expression
  (concatenated or fused tensors);
- ``{"prod": [e1, e2, ...]}``: a row-major product, index ``i * |e2| + j``
  (heads × head dim, groups of a grouped conv, channel × spatial after flatten).

An axis with no permutable part has expression ``None``. A group may be declared *per block* of
another group (``per``): then every block of that group carries its own permutation of it (the
wreath product: heads move, and each head's dims permute on their own). The format is versioned and
documented in docs/spec-format.md.

Beyond permutations, ``maps`` lists continuous symmetries (orthogonal, invertible, rotary and
scaling maps; see ``autoperm.maps``) and ``map_pins`` the kinds that do not hold somewhere, and why
(format version 3).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["PermutationSpec", "Group", "Member", "Pin", "ModuleGroup", "SPEC_FORMAT_VERSION", "walk_groups"]

SPEC_FORMAT_VERSION = 3  # the newest version this autoperm reads and writes (the oldest that says everything a spec holds)


@dataclass(frozen=True)
class Member:
    """One place a group acts: ``key``'s axis ``axis``, inside ``expr`` (the axis' full expression)."""

    key: str
    axis: int
    expr: dict


@dataclass(frozen=True)
class Group:
    """A permutation group: ``size`` units permuted together wherever ``members`` say."""

    name: str
    size: int
    members: tuple[Member, ...]
    per: str | None = None  # the block group: each of its blocks permutes this group on its own

    @property
    def keys(self) -> list[str]:
        return sorted({m.key for m in self.members})


@dataclass(frozen=True)
class Pin:
    """An axis (or part of one, ``size`` indices) that may not be permuted, and why."""

    key: str
    axis: int
    size: int
    reason: str


@dataclass(frozen=True)
class ModuleGroup:
    """Whole modules that move together with the units of a group (experts held in an ``nn.ModuleList``).

    Unit ``i`` of group ``axis`` is the module whose state-dict keys start with ``prefixes[i]``; the
    modules have the same keys and shapes. Under a permutation ``p`` of ``axis``, module slot ``i``
    receives the tensors of module ``p[i]``. ``local`` lists families of groups that act inside one
    module each: family ``f`` holds one group per module (``local[f][i]`` acts only in module ``i``, at
    the same places as the family's other groups in theirs); its permutation for slot ``i`` is applied
    to the tensors slot ``i`` receives (see ``autoperm._modules``).
    """

    axis: str
    prefixes: tuple[str, ...]
    local: tuple[tuple[str, ...], ...] = ()

    def to_dict(self) -> dict:
        return {"group": self.axis, "prefixes": list(self.prefixes), "local": [list(f) for f in self.local]}

    @classmethod
    def from_dict(cls, d) -> "ModuleGroup":
        return cls(d["group"], tuple(d["prefixes"]), tuple(tuple(f) for f in d.get("local", ())))


def expr_size(expr, sizes) -> int:
    """Number of indices an axis expression spans, with group sizes ``sizes``.

    >>> expr_size({"cat": [{"fixed": 2}, {"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 3, "d": 4})
    14
    """
    if expr is None:
        raise ValueError("an identity axis has no size of its own")
    if "g" in expr:
        return sizes[expr["g"]]
    if "fixed" in expr:
        return expr["fixed"]
    ns = [expr_size(e, sizes) for e in next(iter(expr.values()))]
    if "cat" in expr:
        return sum(ns)
    out = 1
    for n in ns:
        out *= n
    return out


def walk_groups(expr):
    """Group names in an axis expression, in order.

    >>> walk_groups({"prod": [{"g": "heads"}, {"fixed": 2}, {"g": "dim"}]})
    ['heads', 'dim']
    """
    if not expr:
        return []
    if "g" in expr:
        return [expr["g"]]
    if "fixed" in expr:
        return []
    return [g for e in next(iter(expr.values())) for g in walk_groups(e)]


@dataclass
class PermutationSpec:
    """The inferred permutation symmetries of a model.

    ``axes[key][i]`` is the expression of state-dict tensor ``key``'s axis ``i``;
    ``groups`` lists each group with its members; ``pinned`` the axes that may
    not move, with reasons; ``unsupported`` the graph nodes that had no rule.

    >>> spec = PermutationSpec.from_axes({"w1": [{"g": "h"}, None], "w2": [None, {"g": "h"}]}, {"h": 3})
    >>> [(g.name, g.size, g.keys) for g in spec.groups]
    [('h', 3, ['w1', 'w2'])]
    >>> PermutationSpec.from_json(spec.to_json()) == spec
    True

    ``per[d] = h`` declares group ``d`` independent per block of group ``h``: a permutation gives
    ``d`` one row per block of ``h`` (see ``autoperm.permutation``).

    >>> heads = PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 3},
    ...                                   per={"d": "h"})
    >>> heads.group("d").per, heads.block_count("d"), heads.to_dict()["version"]
    ('h', 2, 2)
    """

    axes: dict[str, list]
    group_sizes: dict[str, int]
    pinned: list[Pin] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    per: dict[str, str] = field(default_factory=dict)
    maps: list = field(default_factory=list)  # autoperm.maps.Map
    map_pins: list = field(default_factory=list)  # autoperm.maps.MapPin
    modules: list[ModuleGroup] = field(default_factory=list)

    @classmethod
    def from_axes(cls, axes, group_sizes, pinned=(), shapes=None, unsupported=(), per=None, maps=(), map_pins=(),
                  modules=()):
        spec = cls(dict(axes), dict(group_sizes), list(pinned), dict(shapes or {}), list(unsupported), dict(per or {}),
                   list(maps), list(map_pins))
        spec.modules = [m if isinstance(m, ModuleGroup) else ModuleGroup.from_dict(m) for m in modules]
        if spec.per:
            from ._wreath import check_per
            check_per(spec)
        if spec.modules:
            from ._modules import check_modules
            check_modules(spec)
        return spec

    def block_count(self, name: str) -> int:
        """Number of blocks of ``name``'s block group (1 for a group that is not per block)."""
        b = self.per.get(name)
        return self.group_sizes[b] if b is not None else 1

    # -- derived views ------------------------------------------------------
    @property
    def groups(self) -> list[Group]:
        members: dict[str, list[Member]] = {n: [] for n in self.group_sizes}
        for key, exprs in self.axes.items():
            for i, e in enumerate(exprs):
                for g in dict.fromkeys(walk_groups(e)):
                    members[g].append(Member(key, i, e))
        return [Group(n, self.group_sizes[n], tuple(members[n]), self.per.get(n)) for n in self.group_sizes]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}")

    @property
    def num_units(self) -> int:
        """Total permutable units (sum of group sizes)."""
        return sum(self.group_sizes.values())

    @property
    def num_rows(self) -> int:
        """Permutation entries of an element: a per-block group counts once per block (what ``units_moved`` counts)."""
        return sum(s * self.block_count(n) for n, s in self.group_sizes.items())

    def permuted_fraction(self) -> float:
        """Fraction of state-dict elements in tensors with at least one permuted axis."""
        import math

        tot = sum(math.prod(s) for k, s in self.shapes.items())
        hit = sum(math.prod(self.shapes[k]) for k, ex in self.axes.items() if any(ex) and k in self.shapes)
        return hit / tot if tot else 0.0

    def summary(self) -> dict:
        """A compact, stable summary: group names and sizes, which group is per block of which, pinned
        axes with reasons, unsupported ops.

        >>> spec = PermutationSpec.from_axes({"w": [{"prod": [{"g": "h"}, {"g": "d"}]}]}, {"h": 2, "d": 3},
        ...                                  per={"d": "h"})
        >>> spec.summary()["per"]
        {'d': 'h'}
        """
        return {
            "groups": {n: s for n, s in self.group_sizes.items()},
            "per": {n: self.per[n] for n in self.group_sizes if n in self.per},
            "pinned": sorted({f"{p.key}:{p.axis} ({p.size}) {p.reason}" for p in self.pinned}),
            "unsupported": list(self.unsupported),
        }

    # -- serialisation ------------------------------------------------------
    @property
    def version(self) -> int:
        """The oldest format version that can say everything this spec holds."""
        return 3 if (self.maps or self.map_pins or self.modules) else 2 if self.per else 1

    def to_dict(self) -> dict:
        extra = {}
        if self.version >= 3:
            extra = {"maps": [m.to_dict() for m in self.maps],
                     "map_pins": [{"where": p.where, "kind": p.kind, "reason": p.reason} for p in self.map_pins]}
        return {
            "format": "autoperm.spec",
            "version": self.version,
            "groups": [{"name": n, "size": s, **({"per": self.per[n]} if n in self.per else {})}
                       for n, s in self.group_sizes.items()],
            "axes": self.axes,
            "shapes": self.shapes,
            "pinned": [{"key": p.key, "axis": p.axis, "size": p.size, "reason": p.reason} for p in self.pinned],
            "unsupported": self.unsupported,
            **extra,
            **({"modules": [m.to_dict() for m in self.modules]} if self.modules else {}),
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "PermutationSpec":
        d = json.loads(text)
        if d.get("format") != "autoperm.spec":
            raise ValueError("not an autoperm spec (missing format: autoperm.spec)")
        if d.get("version") not in range(1, SPEC_FORMAT_VERSION + 1):
            raise ValueError(f"unsupported spec version {d.get('version')}; this autoperm reads 1 to {SPEC_FORMAT_VERSION}")
        if d.get("version") == 1 and any("per" in g for g in d["groups"]):
            raise ValueError("a version-1 spec cannot declare groups per block ('per' needs version 2)")
        if d.get("version") < 3 and (d.get("maps") or d.get("map_pins")):
            raise ValueError("a spec before version 3 cannot declare maps ('maps' needs version 3)")
        if d.get("version") < 3 and "modules" in d:
            raise ValueError(f"a version-{d.get('version')} spec cannot declare module groups ('modules' needs version 3)")
        from .maps.map import Map, MapPin
        return cls.from_axes(
            d["axes"], {g["name"]: g["size"] for g in d["groups"]},
            [Pin(**p) for p in d.get("pinned", [])], d.get("shapes", {}), d.get("unsupported", []),
            {g["name"]: g["per"] for g in d["groups"] if "per" in g},
            [Map.from_dict(m) for m in d.get("maps", [])], [MapPin(**p) for p in d.get("map_pins", [])],
            modules=[ModuleGroup.from_dict(m) for m in d.get("modules", [])],
        )

    def expr_size(self, expr) -> int:
        """Number of indices an axis expression spans."""
        return expr_size(expr, self.group_sizes)

    def locate(self, key: str, axis: int, group: str) -> tuple[int, int]:
        """``(offset, stride)``: unit ``u`` of ``group`` sits at index ``offset + u * stride`` of the axis.

        With other coordinates at zero; in a product, the factors after the group repeat each
        unit ``stride`` times (heads × head dim: the head group has stride = head dim).

        >>> spec = PermutationSpec.from_axes({"w": [{"cat": [{"fixed": 2}, {"prod": [{"g": "h"}, {"g": "d"}]}]}]},
        ...                                  {"h": 3, "d": 4})
        >>> spec.locate("w", 0, "h"), spec.locate("w", 0, "d")
        ((2, 4), (2, 1))
        """
        found = self._locate(self.axes[key][axis], group)
        if found is None:
            raise KeyError(f"group {group!r} does not act on {key}:{axis}")
        return found

    def _locate(self, expr, group):
        if not expr or "fixed" in expr:
            return None
        if "g" in expr:
            return (0, 1) if expr["g"] == group else None
        parts = next(iter(expr.values()))
        sizes = [self.expr_size(e) for e in parts]
        for i, e in enumerate(parts):
            hit = self._locate(e, group)
            if hit is None:
                continue
            if "cat" in expr:
                return sum(sizes[:i]) + hit[0], hit[1]
            inner = 1
            for x in sizes[i + 1:]:
                inner *= x
            return hit[0] * inner, hit[1] * inner
        return None

    def to_axes_to_perm(self, strict: bool = False) -> tuple[dict, dict]:
        """Export to git-re-basin's form: ``(perm_to_axes, axes_to_perm)``.

        That form can only say "axis i is permuted by group P". Axes with a
        structured expression (cat / prod) or a group that is per block are not expressible: with
        ``strict=True`` they raise, otherwise they map to None (left unpermuted
        by such tools, which is only sound if the user drops those groups).
        """
        axes_to_perm, perm_to_axes = {}, {}
        for key, exprs in self.axes.items():
            row = []
            for i, e in enumerate(exprs):
                if e is not None and "g" in e and e["g"] not in self.per:
                    row.append(e["g"])
                    perm_to_axes.setdefault(e["g"], []).append((key, i))
                else:
                    if e is not None and strict:
                        raise ValueError(f"{key}:{i} has structured expression {e}; not expressible as axes_to_perm")
                    row.append(None)
            axes_to_perm[key] = tuple(row)
        return perm_to_axes, axes_to_perm
