"""Symmetry groups of the plane: spec strings -> escnn gspaces, field types and grids.

Every group eqzoo supports is a subgroup of O(2). An element is written ``(s, θ)``: first reflect
when ``s = 1``, then rotate by θ, so it acts on the plane by ``M(s, θ) = R_θ F^s`` with ``F`` the
reflection escnn uses (``x -> -x``). Finite groups have ``θ ∈ {2πk/N}``; ``D1`` has only the
reflection and ``C1`` only the identity.

Accepted specs: ``"O2"``, ``"SO2"``, ``"D<N>"``, ``"C<N>"`` (N ≥ 1; ``"D1"`` are the flips and
``"C1"`` the trivial group), in any case, and ``"O(2)"`` / ``"SO(2)"`` for the continuous groups.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np

ACCEPTED = '"O2", "SO2", "D<N>" or "C<N>" with N >= 1 (e.g. "D4", "C8", "D1" for flips, "C1" trivial)'

# Band-limit of the regular-like fields used for O(2)/SO(2) when none is given.
DEFAULT_FIELD_BANDLIMIT = 3


@dataclass(frozen=True)
class Group:
    """A parsed group spec with what eqzoo needs at build time."""

    spec: str
    has_flip: bool
    n_rot: int  # number of rotations; 0 for the continuous groups O(2), SO(2)

    @property
    def is_finite(self) -> bool:
        return self.n_rot > 0

    @property
    def order(self) -> int:
        """|G|, or 0 for the continuous groups."""
        return self.n_rot * self.n_flip

    @property
    def n_flip(self) -> int:
        return 2 if self.has_flip else 1

    @functools.cached_property
    def gspace(self):
        from escnn import gspaces  # (escnn and torch load only when a group is built: specs parse without them)

        if self.is_finite:
            if self.has_flip:
                return gspaces.flipRot2dOnR2(N=self.n_rot)
            return gspaces.rot2dOnR2(N=self.n_rot)
        if self.has_flip:
            return gspaces.flipRot2dOnR2(N=-1)
        return gspaces.rot2dOnR2(N=-1)

    # -- field types -------------------------------------------------------------------------
    def field_repr(self, bandlimit: int | None = None):
        """The representation of one field: regular for finite groups, band-limited regular
        (all irreps up to frequency ``bandlimit``, once each) for O(2)/SO(2)."""
        G = self.gspace.fibergroup
        if self.is_finite:
            return G.regular_representation
        L = DEFAULT_FIELD_BANDLIMIT if bandlimit is None else int(bandlimit)
        return G.bl_regular_representation(L=L)

    def field_size(self, bandlimit: int | None = None) -> int:
        if self.is_finite:  # |G|, without building the representation (costly for large groups)
            return self.order
        return self.field_repr(bandlimit).size

    def field_type(self, n_fields: int, bandlimit: int | None = None):
        return self.gspace.type(*[self.field_repr(bandlimit)] * n_fields)

    def trivial_type(self, n: int):
        return self.gspace.type(*[self.gspace.trivial_repr] * n)

    # -- elements ----------------------------------------------------------------------------
    def element(self, s: int, theta: float):
        """The escnn element ``(s, θ)``."""
        G = self.gspace.fibergroup
        if self.spec == "D1":  # escnn's D1 is C2 acting by the flip
            return G.element(int(s))
        if self.is_finite:
            k = int(round(theta * self.n_rot / (2 * math.pi))) % self.n_rot
            return G.element((int(s), k) if self.has_flip else k)
        if self.has_flip:
            return G.element((int(s), float(theta)), "radians")
        return G.element(float(theta), "radians")

    def coords(self, g) -> tuple[int, float]:
        """``(s, θ)`` of an escnn element of this group, θ in [0, 2π)."""
        if self.spec == "D1":
            return int(g.to("int")), 0.0
        if self.n_rot == 1 and not self.has_flip:
            return 0, 0.0
        v = g.to("radians")
        s, theta = (int(v[0]), float(v[1])) if self.has_flip else (0, float(v))
        return s, theta % (2 * math.pi)

    def grid(self, n_rot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A grid of the group as arrays ``(s, θ)`` ordered flip-major: all rotations with s=0,
        then all with s=1. Finite groups: all elements (``n_rot`` ignored)."""
        n = self.n_rot if self.is_finite else int(n_rot)
        theta = 2 * np.pi * np.arange(n) / n
        s = np.repeat(np.arange(self.n_flip), n)
        return s, np.tile(theta, self.n_flip)

    def elements(self, n_rot: int | None = None) -> list:
        return [self.element(s, t) for s, t in zip(*self.grid(n_rot))]

    def subgroups(self) -> list[tuple[str, int, bool]]:
        """Candidate subgroups as ``(name, n_rot, has_flip)``, n_rot = 0 meaning all rotations.
        Reflection subgroups contain the reflection ``(1, 0)``."""
        if self.is_finite:
            ns = [k for k in range(1, self.n_rot + 1) if self.n_rot % k == 0]
        else:
            ns = list(range(1, 13)) + [0]
        out = []
        for k in ns:
            for f in ([False, True] if self.has_flip else [False]):
                name = ("O2" if f else "SO2") if k == 0 else f"{'D' if f else 'C'}{k}"
                out.append((name, k, f))
        return out

    def largest_subgroup(self, kept) -> str:
        """The name of the largest subgroup ``(n_rot, has_flip)`` of :meth:`subgroups` for which
        ``kept(n_rot, has_flip)`` holds (a continuous one is larger than any finite one); "C1" when none."""
        best, best_size = "C1", 1
        for name, k, flip in self.subgroups():
            size = (1 + flip) * (k if k else 10**9)
            if size > best_size and kept(k, flip):
                best, best_size = name, size
        return best

    def __str__(self) -> str:
        return self.spec


# ASCII digits without leading zeros: one spelling per group ("D04" and "D٤" are not D4)
_SPEC = re.compile(r"^(O2|SO2|D([1-9][0-9]*)|C([1-9][0-9]*))$", re.ASCII)


def get_group(spec) -> Group:
    """Parse a group spec (or pass a :class:`Group` through)."""
    if isinstance(spec, Group):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"group must be a string, one of {ACCEPTED}; got {spec!r}")
    key = spec.strip().upper().replace("(2)", "2")  # "SO(2)" and "O(2)" as written in papers
    m = _SPEC.match(key)
    if not m:
        raise ValueError(f"unknown group {spec!r}: accepted are {ACCEPTED}")
    return _parsed(key)


@functools.lru_cache(maxsize=None)
def _parsed(key: str) -> Group:
    if key == "O2":
        return Group(key, True, 0)
    if key == "SO2":
        return Group(key, False, 0)
    return Group(key, key[0] == "D", int(key[1:]))


def group_of(field_type) -> Group:
    """The eqzoo group of an escnn FieldType (or GSpace), read from the gspace's structure."""
    gs = getattr(field_type, "gspace", field_type)
    name = gs.fibergroup.name
    if name in ("O(2)", "SO(2)"):
        return get_group(name)
    flips, n = getattr(gs, "flips_order", 0), getattr(gs, "rotations_order", None)
    if n is None or n < 1:
        raise ValueError(f"unsupported gspace {gs.name}: eqzoo supports subgroups of O(2): {ACCEPTED}")
    return get_group(f"{'D' if flips > 0 else 'C'}{n}")
