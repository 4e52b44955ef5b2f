"""The per-element operators of one layer's twirl: the pixel basis, the action on the
coefficients, ρ_in, ρ_out, and the sparse pattern of A(w) (see :mod:`eqzoo.nn.twirl`).

They depend only on the group, the field types, the kernel size, dilation and basis: computed
once per process, and cached on disk under :func:`eqzoo.kernels.cache_dir`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..._io import atomic_write
from ...groups import Group
from ...kernels import cache_dir, invariant_basis, kernel_basis

# The layout of the files in the disk cache and of what they hold; a change to either (or to the
# bases) bumps it, so that older files are never read.
CACHE_VERSION = 7


@dataclass
class SparseTwirl:
    r"""The pattern and per-element values of :math:`A(w) = Σ_g w_g A_g` (see :mod:`eqzoo.nn.twirl`).

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


_MEMORY: dict = {}
SPARSE_FIELDS = ("cols", "values", "rows_t", "values_t")


def twirl_operators(group: Group, rep_in, rep_out, kernel_size: int, dilation: int,
                    n_rot: int, basis: str) -> TwirlOperators:
    """The operators for one layer (``basis`` a resolved name of :data:`eqzoo.kernels.BASES`), cached
    in memory and on disk."""
    key = (group.spec, rep_in.name, rep_out.name, kernel_size, dilation, n_rot, basis)
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
        ops = _compute_operators(group, rep_in, rep_out, kernel_basis(kernel_size, dilation, basis, group), n_rot)
        _write_cache(path, ops)
    _MEMORY[key] = ops
    return ops


def _compute_operators(group, rep_in, rep_out, harm, n_rot) -> TwirlOperators:
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
