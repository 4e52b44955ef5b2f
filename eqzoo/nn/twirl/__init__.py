r"""The λ-twirl: the filter of a partially equivariant layer from unconstrained coefficients.

A kernel is expanded in functions ψ_h that the group maps into their own span (see
:mod:`eqzoo.kernels`), so the λ-twirl

.. math:: A_λ κ(x) = \int_G λ(g)\, ρ_{out}(g)\, κ(g^{-1}x)\, ρ_{in}(g)^{T}\, dg

acts on the coefficients only: ``W'_k = Σ_g w_g Σ_h T(g)_{hk} ρ_out(g) W_h ρ_in(g)ᵀ`` with the
quadrature weights ``w_g`` of :meth:`~eqzoo.GroupLikelihood.kernel_weights`. Written as one matrix
on the coefficients of a field pair, indexed (out component, in component, harmonic),

.. math:: W' = A(w)\,W, \qquad A(w) = \sum_g w_g\; ρ_{out}(g) ⊗ ρ_{in}(g) ⊗ T(g)^{T}.

The integrand is a trigonometric polynomial of degree ≤ F = (max frequency of ρ_in, ρ_out, ψ), so
a grid of more than F + L_out rotations integrates it exactly; finite groups sum over all their
elements. Uniform λ gives P, the projection onto the G-equivariant kernels of this space (escnn's
strict basis), λ = δ_e leaves κ free, and λ uniform on a subgroup K gives K-equivariance.

A layer's filter is built from two unconstrained kernels κ_0, κ_1:

.. math:: κ_λ = A_λ κ_0 + (A_λ - P)\, κ_1 .

A_λ κ_0 alone spans the same kernels (the λ-twirl of the paper; A_λ P = P, so the second term is
A_λ (I - P) κ_1). κ_1, the *symmetry-breaking* part, is there for the optimiser: in A_λ κ_0 the
non-equivariant part of κ_0 gets a gradient of the size of λ's distance from uniform, and an
adaptive optimiser cannot scale it up, because the same coordinates carry the equivariant part's
far larger gradient. As a parameter of its own (only where λ is learnable, starting at 0) κ_1
learns at the optimiser's pace, and λ still decides how much of it the filter gets (none at
uniform λ).

The package:

- :mod:`.reference`: the definition above, one dense term per element (slow; what the tests check
  the fast paths against);
- :mod:`.sparse`: A(w) is sparse with a pattern that does not depend on w (T(g) only mixes a
  harmonic with its partner of the same frequency, regular fields of finite groups have
  permutation matrices, escnn's band-limited fields of O(2)/SO(2) 2 x 2 blocks): a step computes
  A(w)'s few values per row with one small matmul and gathers rows;
- :mod:`.frame`: where the out fields are regular fields of a finite group, in the layer's
  regular frame the twirl is one |G| x |G| matrix;
- :mod:`.layout`: the :class:`Layout` interface both hand their result over with (the pixel filter
  or the harmonic matrix);
- :mod:`.operators`: the per-element operators, computed once per process and cached on disk.
"""
from __future__ import annotations

import torch

from . import frame, reference, sparse
from .frame import Frame, RegularTwirlFunction
from .layout import KINDS, Dims, Layout
from .operators import CACHE_VERSION, TwirlOperators, twirl_operators
from .sparse import SparseConstants, SparseTwirlFunction

__all__ = ["Twirl", "twirl_of", "Dims", "Layout", "KINDS", "TwirlOperators", "twirl_operators", "CACHE_VERSION",
           "reference"]


class Twirl:
    """One layer's twirl in one dtype on one device: the operators as tensors, and the path they
    take (the regular frame where the fields have one, else the sparse gathers). Coefficients are
    ``[d_out * d_in * H, F_out, F_in]``, *stored* in the frame where there is one and in the
    canonical layout (rows (a, b, h)) otherwise."""

    def __init__(self, ops: TwirlOperators, dtype: torch.dtype, device: torch.device):
        floats, ints = dict(dtype=dtype, device=device), dict(dtype=torch.int64, device=device)
        self.sparse = SparseConstants.of(ops.sparse, ops.basis, floats, ints)
        self.frame = Frame.of(ops, floats, ints)
        self.bias_basis = torch.tensor(ops.invariant_out, **floats)  # [d_out, t]: the invariant vectors
        self.size = ops.sparse.values.shape[0]  # quadrature points

    def __call__(self, kind: str, dims: Dims, q: torch.Tensor, W0: torch.Tensor,
                 W1: torch.Tensor | None = None) -> torch.Tensor:
        """``A(q) W0 + (A(q) - P) W1`` (W1 optional) for stored coefficients, as ``kind`` (see :data:`KINDS`)."""
        q1 = None if W1 is None else q - 1.0 / q.numel()  # A(q) - P = A(q - uniform): A is linear in q
        if self.frame is not None:
            return RegularTwirlFunction.apply(self.frame, frame.layout(kind, dims, self.frame), W0, q, W1, q1)
        return SparseTwirlFunction.apply(self.sparse, sparse.layout(kind, dims, self.sparse), W0, q, W1, q1)

    def canonical_twirl(self, kind: str, dims: Dims, q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``A(q) W`` for coefficients in the canonical layout (whatever the storage), as ``kind``."""
        return SparseTwirlFunction.apply(self.sparse, sparse.layout(kind, dims, self.sparse), W, q, None, None)

    def projected(self, dims: Dims, W: torch.Tensor) -> torch.Tensor:
        """P W, the equivariant part of stored coefficients ``W`` (an orthogonal projection)."""
        if self.frame is not None:
            return (self.frame.uniform @ W.reshape(self.frame.uniform.shape[0], -1)).view_as(W)
        uniform = W.new_full((self.size,), 1.0 / self.size)
        return self.rows_of_matrix(self.canonical_twirl("harmonics", dims, uniform, W), dims)

    def canonical(self, dims: Dims, W: torch.Tensor) -> torch.Tensor:
        """Stored coefficients -> the canonical layout (differentiable)."""
        if self.frame is None:
            return W
        return self.frame.canonical(W.reshape(dims.d_out, -1), dims).view(W.shape)

    def stored(self, dims: Dims, W: torch.Tensor) -> torch.Tensor:
        """Canonical coefficients -> the stored layout (the inverse of :meth:`canonical`)."""
        if self.frame is None:
            return W
        return self.frame.framed(W, dims).view(W.shape)

    @staticmethod
    def rows_of_matrix(matrix: torch.Tensor, dims: Dims) -> torch.Tensor:
        """A harmonic matrix ``[(a o), (b h i)]`` back in the canonical layout ``[(a b h), o, i]``."""
        d = dims
        out = matrix.view(d.d_out, d.fields_out, d.d_in, d.harmonics, d.fields_in)
        return out.permute(0, 2, 3, 1, 4).reshape(d.rows, d.fields_out, d.fields_in)

    def prepare(self, dims: Dims) -> None:
        """Make the frame's gathers for ``dims`` now, in eager mode: under ``torch.compile`` whatever
        is not cached yet is built inside the graph, again at every step."""
        if self.frame is not None:
            self.frame.pixel_gather(dims)
            self.frame.harmonic_gather(dims)


_TWIRLS: dict = {}


def twirl_of(ops: TwirlOperators, dtype: torch.dtype, device: torch.device) -> Twirl:
    """``ops`` as a :class:`Twirl` in ``dtype`` on ``device``, made once and shared by every layer
    with the same operators (most layers of a network; the twirl values grow with the group's
    order squared, so one copy per layer would multiply a model's memory). Cast from the float64
    operators, so ``.double()`` layers are exact; kept for the process."""
    key = (id(ops), dtype, device)
    entry = _TWIRLS.get(key)
    if entry is None:
        entry = (ops, Twirl(ops, dtype, device))
        if not torch.compiler.is_compiling():
            _TWIRLS[key] = entry  # holding ops keeps id(ops) from being reused
    return entry[1]
