r"""The functions steerable kernels are expanded in, and facts about representations.

An unconstrained, band-limited kernel between a field of type ρ_in and one of type ρ_out is

.. math:: κ_0(x) = \sum_h W_h\, ψ_h(x), \qquad W_h ∈ \mathbb{R}^{d_{out} × d_{in}},

with ψ_h ring harmonics: Gaussian rings × cos/sin(fφ), the frequency cut off per ring (escnn's
R2Conv rings, or a ring through every pixel radius: see :data:`BASES`). Rotating or reflecting the
plane maps these functions into their own span, ``ψ_h(M(g)^{-1} x) = Σ_k T(g)_{hk} ψ_k(x)``, so a
group acts on kernels through their coefficients alone (:meth:`RingHarmonics.action`); the twirl
built on this is :mod:`eqzoo.nn.twirl`. Where the harmonics are linearly dependent on the pixels,
:func:`kernel_basis` keeps exactly a basis of the kernels they span (:class:`SampledHarmonics`).

Everything here depends only on the group, the field types, kernel size and band-limits, and is
computed while a layer is built.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .groups import Group


def cache_dir() -> Path:
    """Where basis precomputations are cached (``$EQZOO_CACHE`` or ``~/.cache/eqzoo``)."""
    return Path(os.environ.get("EQZOO_CACHE", Path.home() / ".cache" / "eqzoo"))


# -- ring harmonics --------------------------------------------------------------------------------

@dataclass(frozen=True)
class RingHarmonics:
    """The band-limited harmonic basis ψ_h on rings that escnn's R2Conv uses for a kernel size."""

    kernel_size: int
    dilation: int
    rings: tuple  # (radius, sigma, max frequency)

    @functools.cached_property
    def elements(self) -> list[tuple[float, float, int, int]]:
        """(radius, sigma, frequency f, 0 for cos / 1 for sin)."""
        out = []
        for r, sigma, fmax in self.rings:
            for f in range(fmax + 1):
                out.append((r, sigma, f, 0))
                if f > 0:
                    out.append((r, sigma, f, 1))
        return out

    @property
    def size(self) -> int:
        return len(self.elements)

    @property
    def max_frequency(self) -> int:
        return max(f for _, _, f, _ in self.elements)

    def sample(self, points: np.ndarray) -> np.ndarray:
        """ψ_h at points [P, 2] (x, y) -> [H, P]."""
        x, y = points[:, 0], points[:, 1]
        rad = np.hypot(x, y)
        phi = np.arctan2(y, x)
        rows = []
        for r, sigma, f, trig in self.elements:
            radial = np.exp(-0.5 * (rad - r) ** 2 / sigma**2)
            angular = np.cos(f * phi) if trig == 0 else np.sin(f * phi)
            if f > 0:  # a steerable function of frequency f > 0 vanishes at the origin
                angular = np.where(rad < 1e-9, 0.0, angular)
            rows.append(radial * angular)
        return np.stack(rows)

    def pixel_points(self) -> np.ndarray:
        """Centres of the k x k pixels as (x, y), row-major, y pointing up (escnn's convention)."""
        k, d = self.kernel_size, self.dilation
        origin = (d * (k - 1)) / 2
        rows, cols = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        return np.stack([cols.ravel() * d - origin, origin - rows.ravel() * d], axis=1).astype(np.float64)

    def on_pixels(self) -> np.ndarray:
        """[H, k, k]."""
        k = self.kernel_size
        return self.sample(self.pixel_points()).reshape(self.size, k, k)

    def action(self, s: int, theta: float) -> np.ndarray:
        """T with ψ_h(M^{-1} x) = Σ_k T[h, k] ψ_k(x) for M = R_θ F^s, F: x -> -x.

        M^{-1} x has angle β = φ - θ (s = 0) or π - β (s = 1), and
        cos f(π-β) = (-1)^f cos fβ,  sin f(π-β) = -(-1)^f sin fβ."""
        H = self.size
        T = np.zeros((H, H))
        index = {e: i for i, e in enumerate(self.elements)}
        for i, (r, sigma, f, trig) in enumerate(self.elements):
            sign = (-1.0) ** f if s else 1.0
            c, sn = math.cos(f * theta), math.sin(f * theta)
            j_cos = index[(r, sigma, f, 0)]
            if trig == 0:  # cos f(φ-θ) = cos fφ cos fθ + sin fφ sin fθ
                T[i, j_cos] += sign * c
                if f > 0:
                    T[i, index[(r, sigma, f, 1)]] += sign * sn
            else:  # sin f(φ-θ) = sin fφ cos fθ - cos fφ sin fθ
                sign = -sign if s else sign
                T[i, index[(r, sigma, f, 1)]] += sign * c
                T[i, j_cos] += -sign * sn
        return T


# The kernel bases a layer can expand its filters in.
#   "antialiased": escnn's R2Conv rings, widths and frequency cut-offs. Smooth filters that rotate
#       well off the pixel grid, but they span only part of the k x k kernels (6 of 9 for 3x3, 18
#       of 49 for 7x7), even where λ frees the kernel.
#   "complete": a ring through every distinct pixel radius, with every frequency its pixels can
#       carry (half their count): the filters span every k x k kernel, so a model over C1 (or with
#       λ at the identity) has exactly a plain CNN's function class, at the price of aliasing
#       under rotations that do not map the pixel grid to itself.
#   "auto" (the default): "complete" for the groups whose every element maps the pixel grid to
#       itself (C1, C2, C4, D1, D2, D4), where it costs no equivariance, else "antialiased".
BASES = ("auto", "antialiased", "complete")
_COMPLETE_SIGMA = 0.4  # ring width in pixels: narrow enough to tell neighbouring radii apart


def maps_grid_to_itself(group) -> bool:
    """Whether every element of ``group`` (a :class:`~eqzoo.groups.Group`) permutes the pixels of
    a square kernel: the subgroups of the 90-degree rotations and reflections."""
    return group.is_finite and group.n_rot in (1, 2, 4)


def resolved_basis(basis: str, group) -> str:
    """The basis ``"auto"`` stands for over ``group`` (a :class:`~eqzoo.groups.Group`); others as given."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis != "auto":
        return basis
    return "complete" if maps_grid_to_itself(group) else "antialiased"


@functools.lru_cache(maxsize=None)
def ring_harmonics(kernel_size: int, dilation: int = 1, basis: str = "antialiased") -> RingHarmonics:
    """The ring harmonics of a ``basis`` (see :data:`BASES`) for a kernel size and dilation."""
    if basis == "complete":
        return _complete_harmonics(kernel_size, dilation)
    if basis != "antialiased":
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    from escnn.nn.modules.conv.r2convolution import compute_basis_params

    keep, rings, sigma, max_freq = compute_basis_params(kernel_size, None, None, None, dilation, None)
    out = []
    for r, sg in zip(rings, sigma):
        fmax = max((f for f in range(max_freq + 1) if keep({"radius": r, "irrep:frequency": f,
                                                           "frequency": f, "j": (f, f)})), default=0)
        out.append((float(r), float(sg), int(fmax)))
    return RingHarmonics(kernel_size, dilation, tuple(out))


def _complete_harmonics(kernel_size: int, dilation: int) -> RingHarmonics:
    points = RingHarmonics(kernel_size, dilation, ()).pixel_points()
    radii, counts = np.unique(np.round(np.hypot(points[:, 0], points[:, 1]), 6), return_counts=True)
    rings = tuple((float(r), 0.005 if r == 0 else _COMPLETE_SIGMA * dilation, int(n // 2) if r > 0 else 0)
                  for r, n in zip(radii, counts))
    return RingHarmonics(kernel_size, dilation, rings)


# -- a basis of the sampled kernels ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class SampledHarmonics:
    r"""Orthonormal coordinates ``c`` of the kernels the ring harmonics give on the pixels.

    Sampled on a k x k grid, H ring harmonics can be linearly dependent (the complete basis has
    11 for the 9 pixels of a 3x3 kernel): the coefficients W with ``Σ_h W_h ψ_h(pixels) = 0``
    form a null space N. Where every element of the group permutes the pixels, the group's action
    T(g) maps N to itself, and, being orthogonal, maps N⊥ to itself too. So W = U c with U an
    orthonormal basis of N⊥ gives the same filters for every λ with exactly as many coefficients
    as the kernel space has dimensions; the pixel basis is Uᵀ ψ and the action Uᵀ T(g) U.

    U is chosen per isotypic component of the 90-degree rotations and reflections (D4): cos fφ
    and sin fφ of f ≡ 0 (mod 4), of f ≡ 2 (mod 4), and the pairs (cos fφ, ±sin fφ) of odd f, so
    that Uᵀ T(g) U is a signed permutation, as sparse as T(g). Components without null vectors
    keep their harmonics as they are."""

    harmonics: RingHarmonics
    coordinates: np.ndarray  # U [H, r]

    @property
    def kernel_size(self) -> int:
        return self.harmonics.kernel_size

    @property
    def size(self) -> int:
        return self.coordinates.shape[1]

    @property
    def max_frequency(self) -> int:
        return self.harmonics.max_frequency

    def on_pixels(self) -> np.ndarray:
        """[r, k, k]."""
        return np.einsum("hr,hxy->rxy", self.coordinates, self.harmonics.on_pixels())

    def action(self, s: int, theta: float) -> np.ndarray:
        """Uᵀ T U with T the ring harmonics' :meth:`RingHarmonics.action`, for elements that map the
        pixel grid to itself: a signed permutation, rounded to exactly one (so that a change to
        and from the regular frame gives the same numbers back)."""
        action = self.coordinates.T @ self.harmonics.action(s, theta) @ self.coordinates
        exact = np.round(action)
        if not np.allclose(action, exact, atol=1e-9):
            raise ValueError(f"({s}, {theta}) does not map the pixel grid of {self.harmonics} to itself")
        return exact + 0.0  # (no negative zeros)


def kernel_basis(kernel_size: int, dilation: int, basis: str, group) -> "RingHarmonics | SampledHarmonics":
    """The functions a layer over ``group`` expands its filters in: the ring harmonics of
    ``basis``, reduced to a basis of the kernels they span on the pixels (see
    :class:`SampledHarmonics`) where that is exact, i.e. where the group maps the pixel grid to
    itself; elsewhere the null space is not invariant and the harmonics are kept as they are."""
    harm = ring_harmonics(kernel_size, dilation, basis)
    return _sampled(harm) if maps_grid_to_itself(group) else harm


@functools.lru_cache(maxsize=None)
def _sampled(harm: RingHarmonics) -> "RingHarmonics | SampledHarmonics":
    """``harm`` reduced to a basis of its kernels on the pixels (see :class:`SampledHarmonics`), or
    ``harm`` itself where its harmonics are independent there."""
    pixels = harm.on_pixels().reshape(harm.size, -1)
    tol = 1e-8 * np.linalg.norm(pixels, 2)
    # the D4 isotypic component of each harmonic: for the 1-d ones its (f mod 4, cos/sin); the 2-d
    # one holds the pairs (cos fφ, ±sin fφ) of odd f, as two lists alike in rings and order (sin fφ
    # enters with a minus sign for f ≡ 3 (mod 4), so that every pair transforms alike)
    components: dict = {}
    for h, (_, _, f, trig) in enumerate(harm.elements):
        if f % 2:
            components.setdefault("E", ([], []))[trig].append((h, -1.0 if trig and f % 4 == 3 else 1.0))
        else:
            components.setdefault((f % 4, trig), ([],))[0].append((h, 1.0))
    columns, reduced = [], False
    for lists in components.values():
        n = len(lists[0])
        # coordinates x ∈ R^n of the component's null vectors: Σ_i x_i (± ψ_i) = 0 on the pixels, in
        # every list at once; an orthonormal basis of their complement comes first in u
        stacked = np.concatenate([np.stack([sign * pixels[h] for h, sign in members]) for members in lists], 1)
        u, sv, _ = np.linalg.svd(stacked, full_matrices=False)
        keep = int((sv > tol).sum())
        if keep == n:  # independent: the harmonics stay as they are
            u = np.eye(n)
        reduced |= keep < n
        for j in range(keep):
            for members in lists:
                col = np.zeros(harm.size)
                for (h, sign), x in zip(members, u[:, j]):
                    col[h] = sign * x
                columns.append(col)
    if not reduced or not columns:  # (nothing to reduce, or nothing left: escnn's 2 x 2 rings miss every pixel)
        return harm
    U = np.stack(columns, 1)
    for s, theta in ((0, np.pi / 2), (1, 0.0)):  # the generators of D4 keep U's span: T U = U (Uᵀ T U)
        T = harm.action(s, theta)
        if U.shape[1] != np.linalg.matrix_rank(pixels, tol) or not np.allclose(T @ U, U @ (U.T @ T @ U), atol=1e-9):
            raise RuntimeError(f"the sampled harmonics of {harm} do not reduce exactly")
    return SampledHarmonics(harm, U)


# -- representations ---------------------------------------------------------------------------

def repr_max_frequency(rep) -> int:
    """Highest rotation frequency among the irreps of an escnn representation of a subgroup of O(2)."""
    return max(int(rep.group.irrep(*i).attributes.get("frequency", 0)) for i in rep.irreps)


def invariant_basis(rep) -> np.ndarray:
    """[d, t]: an orthonormal basis of the vectors ρ(g) leaves fixed (ρ's trivial irreps)."""
    Q = rep.change_of_basis
    cols, pos = [], 0
    for irr_id in rep.irreps:
        irr = rep.group.irrep(*irr_id)
        if irr.is_trivial():
            cols.append(Q[:, pos])
        pos += irr.size
    return np.stack(cols, 1) if cols else np.zeros((rep.size, 0))


def permutation_indices(mats: np.ndarray) -> np.ndarray | None:
    """For matrices [m, d, d] that are all permutations, σ [m, d] with ``mats[g, a, σ[g, a]] = 1``;
    else None."""
    ok = np.allclose(np.abs(mats).sum(-1), 1) and np.allclose(np.abs(mats).max(-1), 1) and (mats > -1e-9).all()
    return np.argmax(mats, axis=-1) if ok else None


def quadrature_size(group: Group, rep_in, rep_out, harmonics: RingHarmonics, out_bandlimit) -> int:
    """Rotations the twirl needs: all of a finite group; for O(2)/SO(2) more than F + L_out."""
    if group.is_finite:
        return group.n_rot
    F = repr_max_frequency(rep_in) + repr_max_frequency(rep_out) + harmonics.max_frequency
    L = out_bandlimit or 0
    # also more than 2 L_out, so that λ_out itself is sampled without aliasing (kernel_weights
    # refuses fewer); this binds for low-frequency layers, e.g. a PELinear to trivial fields
    return max(F + L, 2 * L) + 1
