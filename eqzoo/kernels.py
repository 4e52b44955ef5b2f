r"""Build-time maths of relaxed steerable kernels.

An unconstrained, band-limited kernel between a field of type ρ_in and one of type ρ_out is

.. math:: κ_0(x) = \sum_h W_h\, ψ_h(x), \qquad W_h ∈ \mathbb{R}^{d_{out} × d_{in}},

with ψ_h the ring harmonics escnn uses for R2Conv (Gaussian rings × cos/sin(fφ), frequency cut
off per ring; same rings, widths and cut-offs). Rotating or reflecting the plane maps these
functions into their own span: ``ψ_h(M(g)^{-1} x) = Σ_k T(g)_{hk} ψ_k(x)``. So the λ-twirl

.. math:: κ_λ(x) = \int_G λ(g)\, ρ_{out}(g)\, κ_0(g^{-1}x)\, ρ_{in}(g)^{-1}\, dg

acts on the coefficients only: ``W'_k = Σ_g w_g Σ_h T(g)_{hk} ρ_out(g) W_h ρ_in(g)^T`` with the
quadrature weights ``w_g`` of :meth:`GroupLikelihood.kernel_weights`. Written as one matrix on the
coefficients of a field pair, indexed (out component, in component, harmonic),

.. math:: W' = A(w)\,W, \qquad A(w) = \sum_g w_g\; ρ_{out}(g) ⊗ ρ_{in}(g) ⊗ T(g)^{T},

and A(w) is sparse with a pattern that does not depend on w: T(g) only mixes a harmonic with its
partner of the same frequency, regular fields of finite groups have permutation matrices ρ(g), and
escnn's band-limited regular fields of O(2)/SO(2) are sums of irreps with 2 x 2 blocks. So a layer
keeps A's pattern and its per-element values (:class:`SparseTwirl`), and a step computes A(w)'s few
values per row with one small matmul, however many elements the grid has. The integrand is a
trigonometric polynomial of degree ≤ F = (max frequency of ρ_in, ρ_out, ψ), so a grid of more than
F + L_out rotations integrates it exactly; finite groups sum over all their elements.
Uniform λ gives the projection onto the G-equivariant kernels of this band-limited space (escnn's
strict basis), λ = δ_e leaves κ_0 free, and λ uniform on a subgroup K gives K-equivariance.

Everything here depends only on the group, the field types, kernel size and band-limits: it is
computed once per process (and cached on disk) while a layer is built.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._io import atomic_write
from .groups import Group

CACHE_VERSION = 6


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


def resolved_basis(basis: str, group) -> str:
    """The basis ``"auto"`` stands for over ``group`` (a :class:`~eqzoo.groups.Group`); others as given."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if basis != "auto":
        return basis
    return "complete" if group.is_finite and group.n_rot in (1, 2, 4) else "antialiased"


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


@dataclass
class SparseTwirl:
    r"""The pattern and per-element values of :math:`A(w) = Σ_g w_g A_g` (see the module docstring).

    Rows and columns are (out component, in component, harmonic). Row r of A(w) has its non-zeros
    in columns ``cols[r]`` with values ``Σ_g w_g values[g, r]``; rows with fewer than K non-zeros
    are padded with column 0 and value 0. ``rows_t`` / ``values_t`` describe Aᵀ the same way.
    """

    cols: np.ndarray  # [R, K]
    values: np.ndarray  # [m, R, K]
    rows_t: np.ndarray  # [R, K_t]
    values_t: np.ndarray  # [m, R, K_t]


def sparse_twirl(harmonic_action: np.ndarray, rho_in: np.ndarray, rho_out: np.ndarray) -> SparseTwirl:
    """The sparse form of ``Σ_g w_g ρ_out(g) ⊗ ρ_in(g) ⊗ T(g)ᵀ`` for the operators of a grid."""
    import scipy.sparse as sps

    m = harmonic_action.shape[0]
    R = harmonic_action.shape[1] * rho_out.shape[1] * rho_in.shape[1]
    parts = []
    for g in range(m):
        A = sps.kron(sps.csr_matrix(rho_out[g]), sps.kron(sps.csr_matrix(rho_in[g]),
                                                           sps.csr_matrix(harmonic_action[g].T)), format="coo")
        keep = np.abs(A.data) > 1e-12  # cos(π/2) and friends are zeros, not pattern
        parts.append((np.full(keep.sum(), g), A.row[keep], A.col[keep], A.data[keep]))
    g, row, col, val = (np.concatenate(p) for p in zip(*parts))
    # the union of the elements' patterns, sorted by row then column
    entries, which = np.unique(row.astype(np.int64) * R + col, return_inverse=True)
    e_row, e_col = np.divmod(entries, R)
    slot = _slots(e_row, R)
    cols = np.zeros((R, max(1, slot.max(initial=-1) + 1)), dtype=np.int64)
    cols[e_row, slot] = e_col
    values = np.zeros((m,) + cols.shape)
    np.add.at(values, (g, e_row[which], slot[which]), val)
    # Aᵀ: the same entries grouped by column
    order = np.argsort(e_col, kind="stable")
    slot_t = _slots(e_col[order], R)
    rows_t = np.zeros((R, max(1, slot_t.max(initial=-1) + 1)), dtype=np.int64)
    rows_t[e_col[order], slot_t] = e_row[order]
    values_t = np.zeros((m,) + rows_t.shape)
    values_t[:, e_col[order], slot_t] = values[:, e_row[order], slot[order]]
    return SparseTwirl(cols, values, rows_t, values_t)


def _slots(sorted_rows: np.ndarray, n: int) -> np.ndarray:
    """Position of each entry within its row, for entries sorted by row."""
    counts = np.bincount(sorted_rows, minlength=n)
    start = np.cumsum(counts) - counts
    return np.arange(len(sorted_rows)) - start[sorted_rows]


@dataclass
class TwirlOperators:
    """Precomputed per-grid-element operators of one (ρ_in, ρ_out, kernel size) layer."""

    n_rot: int
    basis: np.ndarray  # [H, k, k]
    harmonic_action: np.ndarray  # [m, H, H]
    rho_in: np.ndarray  # [m, d_in, d_in]
    rho_out: np.ndarray  # [m, d_out, d_out]
    invariant_out: np.ndarray  # [d_out, t] orthonormal basis of ρ_out's invariant vectors (bias)
    sparse: SparseTwirl

    def __deepcopy__(self, memo):
        return self  # never modified, and shared through twirl_operators' cache (copies would not be)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.basis, self.harmonic_action, self.rho_in, self.rho_out, self.invariant_out):
            h.update(np.ascontiguousarray(np.round(a, 6) + 0.0).tobytes())
        return h.hexdigest()[:16]


def quadrature_size(group: Group, rep_in, rep_out, harmonics: RingHarmonics, out_bandlimit) -> int:
    """Rotations the twirl needs: all of a finite group; for O(2)/SO(2) more than F + L_out."""
    if group.is_finite:
        return group.n_rot
    F = repr_max_frequency(rep_in) + repr_max_frequency(rep_out) + harmonics.max_frequency
    L = out_bandlimit or 0
    # also more than 2 L_out, so that λ_out itself is sampled without aliasing (kernel_weights
    # refuses fewer); this binds for low-frequency layers, e.g. a PELinear to trivial fields
    return max(F + L, 2 * L) + 1


_MEMORY: dict = {}
SPARSE_FIELDS = ("cols", "values", "rows_t", "values_t")


def twirl_operators(group: Group, rep_in, rep_out, kernel_size: int, dilation: int,
                    n_rot: int, basis: str = "antialiased") -> TwirlOperators:
    """The operators for one layer, cached in memory and on disk."""
    key = (group.spec, rep_in.name, rep_out.name, kernel_size, dilation, n_rot)
    if basis != "antialiased":  # (the default's key is unchanged: existing caches stay valid)
        key += (basis,)
    if key in _MEMORY:
        return _MEMORY[key]
    name = hashlib.sha256(repr((CACHE_VERSION,) + key).encode()).hexdigest()[:24]
    path = cache_dir() / "bases" / f"{name}.npz"
    ops = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                sparse = SparseTwirl(*(z[f"sparse_{f}"] for f in SPARSE_FIELDS))
                ops = TwirlOperators(int(z["n_rot"]), z["basis"], z["harmonic_action"], z["rho_in"],
                                     z["rho_out"], z["invariant_out"], sparse)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            ops = None
    if ops is None:
        ops = _compute_operators(group, rep_in, rep_out, ring_harmonics(kernel_size, dilation, basis), n_rot)
        _write_cache(path, ops)
    _MEMORY[key] = ops
    return ops


def _compute_operators(group, rep_in, rep_out, harm: RingHarmonics, n_rot) -> TwirlOperators:
    s, theta = group.grid(n_rot)
    elements = group.elements(n_rot)
    T = np.stack([harm.action(si, ti) for si, ti in zip(s, theta)])
    r_in = np.stack([rep_in(g) for g in elements])
    r_out = np.stack([rep_out(g) for g in elements])
    return TwirlOperators(n_rot, harm.on_pixels(), T, r_in, r_out, invariant_basis(rep_out),
                          sparse_twirl(T, r_in, r_out))


def _write_cache(path: Path, ops: TwirlOperators) -> None:
    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, n_rot=ops.n_rot, basis=ops.basis, harmonic_action=ops.harmonic_action,
                     rho_in=ops.rho_in, rho_out=ops.rho_out, invariant_out=ops.invariant_out,
                     **{f"sparse_{f}": getattr(ops.sparse, f) for f in SPARSE_FIELDS})

    try:
        atomic_write(path, write)
    except OSError:
        pass  # a read-only home only costs rebuild time
