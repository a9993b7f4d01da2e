"""Continuous symmetries of a model: where a linear map acts in its state dict.

A :class:`Map` is a symmetry group larger than permutations acting on one *space*: ``blocks``
copies of an ``size``-dimensional vector space (one per attention head, or a single residual stream).
Its element is one matrix ``A_b`` per block (of its ``kind``); the model's function is unchanged when
every :class:`Site` of the map is transformed:

- a ``"primal"`` site (a tensor that *writes* vectors of the space: a weight's output rows, a bias, an
  embedding table's columns) becomes ``A_b · T`` along its axis;
- a ``"dual"`` site (a tensor that *reads* them: a weight's input columns, or the key side of a
  query·key product) becomes ``A_b^{-T} · T`` along its axis.

Block ``b``'s unit ``i`` sits at index ``offset + b * block_stride + i * unit_stride`` of the site's axis
(a fused q/k/v projection, heads × head dim, query heads sharing a key/value head).

Kinds (``KINDS``):

- ``"orthogonal"``: ``A_b`` orthogonal (``A^{-T} = A``); with ``center`` it also fixes the all-ones vector,
  so LayerNorm's mean removal commutes with it;
- ``"invertible"``: any invertible ``A_b``;
- ``"rotary"``: a rotation by an angle of its own in each plane of ``pairs`` (units ``i, j``), identity
  elsewhere: what commutes with rotary position embeddings;
- ``"scale"``: a positive diagonal ``A_b`` (hidden units before ReLU-like activations).

A stream read through normalisations carries :class:`Fold` s: each norm's elementwise scale (and shift)
is first folded into the linear layers that read the norm's output, which leaves the function unchanged
and the norm a pure normalisation that commutes with the map.

>>> m = Map("stream", "orthogonal", 4, sites=(Site("emb", 1, "primal"), Site("head", 1, "dual")))
>>> Map.from_dict(m.to_dict()) == m
True
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["Map", "Site", "Fold", "MapPin", "KINDS", "ROLES"]

KINDS = ("orthogonal", "invertible", "rotary", "scale")
ROLES = ("primal", "dual")


@dataclass(frozen=True)
class Site:
    """Tensor ``key``'s axis ``axis`` carries the space: block ``b``'s unit ``i`` at
    ``offset + b * block_stride + i * unit_stride``; ``role`` is ``"primal"`` (writes) or ``"dual"`` (reads)."""

    key: str
    axis: int
    role: str
    offset: int = 0
    block_stride: int = 0
    unit_stride: int = 1

    def index(self, block: int, size: int) -> list[int]:
        """Positions of block ``block``'s ``size`` units on the axis.

        >>> Site("qkv.weight", 0, "primal", offset=8, block_stride=4).index(1, 4)
        [12, 13, 14, 15]
        """
        start = self.offset + block * self.block_stride
        return [start + i * self.unit_stride for i in range(size)]


@dataclass(frozen=True)
class Fold:
    """A normalisation's elementwise scale ``weight`` (and shift ``bias``) over the whole axis it normalises,
    folded into the layers that read its output. ``readers`` are ``(key, axis, bias_key)``: a tensor whose
    ``axis`` reads the norm's output (all of it, index for index), and that layer's bias key (or None).
    ``plus_one``: the norm multiplies by ``1 + weight`` (Gemma)."""

    weight: str | None
    bias: str | None
    readers: tuple[tuple[str, int, str | None], ...]
    plus_one: bool = False


@dataclass(frozen=True)
class MapPin:
    """A symmetry ``kind`` that does not hold on the units of ``where`` (a group or axis), and why."""

    where: str
    kind: str
    reason: str


@dataclass(frozen=True)
class Map:
    """One continuous symmetry: ``blocks`` spaces of dimension ``size`` acted on by matrices of ``kind``."""

    name: str
    kind: str
    size: int
    blocks: int = 1
    sites: tuple[Site, ...] = ()
    folds: tuple[Fold, ...] = ()
    center: bool = False
    pairs: tuple[tuple[int, int], ...] = ()
    group: str | None = None  # the permutation group on the same units, if any (informational)
    reason: str = ""
    holds: tuple[str, ...] = ()  # every kind proven to hold on these units (``kind`` is one of them); () = unstated

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"map {self.name!r}: unknown kind {self.kind!r} (one of {KINDS})")
        for s in self.sites:
            if s.role not in ROLES:
                raise ValueError(f"map {self.name!r}: site {s.key}:{s.axis} has role {s.role!r} (one of {ROLES})")
        if self.kind == "rotary" and not self.pairs:
            raise ValueError(f"rotary map {self.name!r} has no pairs")
        if self.center and self.kind != "orthogonal":
            raise ValueError(f"map {self.name!r}: only an orthogonal map can be centred")

    @property
    def keys(self) -> list[str]:
        """Every state-dict key the map changes (sites, folded norms and their readers)."""
        ks = {s.key for s in self.sites}
        for f in self.folds:
            ks.update(k for k in (f.weight, f.bias) if k)
            ks.update(r[0] for r in f.readers)
            ks.update(r[2] for r in f.readers if r[2])
        return sorted(ks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [list(p) for p in self.pairs]
        d["folds"] = [{**asdict(f), "readers": [list(r) for r in f.readers]} for f in self.folds]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Map":
        d = dict(d)
        d["sites"] = tuple(Site(**s) for s in d.get("sites", ()))
        d["folds"] = tuple(Fold(f["weight"], f["bias"], tuple(tuple(r) for r in f["readers"]), f.get("plus_one", False))
                           for f in d.get("folds", ()))
        d["pairs"] = tuple(tuple(p) for p in d.get("pairs", ()))
        d["holds"] = tuple(d.get("holds", ()))
        return cls(**d)
