r"""The sparse-gather path: any fields, coefficients stored in the canonical layout.

The rows of a term are its coefficients ``W [R, F_o * F_i]``: the R coefficients (a, b, h) of a
field pair for each of the N = F_o * F_i field pairs (o, i), so every product moves whole
contiguous rows. The twirl's values are ``vals = q @ values`` (A's then Aᵀ's), and row r of
``A(q) W`` is ``Σ_k vals[r, k] W[cols[r, k]]``: an ``embedding_bag`` sum with per-sample
weights. The terms are summed as rows, so the layout's conversion (for the pixel filter, a matmul
with the basis and a permutation) runs once per layer, whatever the number of terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .layout import Dims, Layout, padded, rows_of


@dataclass(frozen=True)
class SparseConstants:
    """A layer's sparse operators as tensors: the pixel basis [H, k, k], the twirl values per
    quadrature point (A's [R, K] then Aᵀ's [R, K_t], flattened, so that one matmul gives both),
    A's pattern ``cols`` [R, K], Aᵀ's ``rows_t`` [R, K_t], and the bags of ``cols``
    (``offsets`` [R], ``offset2bag`` [R * K]) for the λ gradient."""

    basis: torch.Tensor
    values: torch.Tensor
    cols: torch.Tensor
    rows_t: torch.Tensor
    offsets: torch.Tensor
    offset2bag: torch.Tensor

    @staticmethod
    def of(sparse, basis, floats: dict, ints: dict) -> "SparseConstants":
        """From the operators' numpy pattern (see :class:`~eqzoo.nn.twirl.operators.SparseTwirl`)."""
        m, R, K = sparse.values.shape
        values = torch.cat([torch.tensor(v).reshape(m, -1) for v in (sparse.values, sparse.values_t)], 1)
        bags = torch.arange(R, **ints)
        return SparseConstants(torch.tensor(basis, **floats), values.to(**floats), torch.tensor(sparse.cols, **ints),
                               torch.tensor(sparse.rows_t, **ints), bags * K, bags.repeat_interleave(K))


@dataclass(frozen=True)
class SparsePixelFilter(Layout):
    """Rows [(a b h), N (+ padding)] -> the pixel filter ``[(o a), (i b), x, y] = Σ_h rows[a b h, o i] ψ_h(x, y)``."""

    dims: Dims
    basis: torch.Tensor  # [H, k, k]

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        d, k = self.dims, self.basis.shape[-1]
        filt = self.basis.view(d.harmonics, k * k).T @ rows.view(d.d_out * d.d_in, d.harmonics, -1)
        filt = filt[:, :, :d.pairs].view(d.d_out, d.d_in, k, k, d.fields_out, d.fields_in)
        return filt.permute(4, 0, 5, 1, 2, 3).reshape(d.fields_out * d.d_out, d.fields_in * d.d_in, k, k)

    def to_rows(self, grad: torch.Tensor) -> torch.Tensor:
        d, k = self.dims, self.basis.shape[-1]
        grad = grad.view(d.fields_out, d.d_out, d.fields_in, d.d_in, k, k).permute(1, 3, 4, 5, 0, 2)
        rows = rows_of(grad, d.d_out * d.d_in * k * k, padded(d.pairs)).view(d.d_out * d.d_in, k * k, -1)
        return (self.basis.view(d.harmonics, k * k) @ rows).view(d.rows, -1)


@dataclass(frozen=True)
class SparseHarmonicMatrix(Layout):
    """Rows [(a b h), N (+ padding)] -> the harmonic matrix [(a o), (b h i)]."""

    dims: Dims

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        d = self.dims
        out = rows[:, :d.pairs].view(d.d_out, d.d_in, d.harmonics, d.fields_out, d.fields_in)
        return out.permute(0, 3, 1, 2, 4).reshape(d.d_out * d.fields_out, d.d_in * d.harmonics * d.fields_in)

    def to_rows(self, grad: torch.Tensor) -> torch.Tensor:
        d = self.dims
        grad = grad.view(d.d_out, d.fields_out, d.d_in, d.harmonics, d.fields_in).permute(0, 2, 3, 1, 4)
        return rows_of(grad, d.rows, padded(d.pairs))


def layout(kind: str, dims: Dims, c: SparseConstants) -> Layout:
    return SparsePixelFilter(dims, c.basis) if kind == "pixels" else SparseHarmonicMatrix(dims)


class SparseTwirlFunction(torch.autograd.Function):
    r"""``A(q0) W0 + A(q1) W1`` (the second term optional) for coefficients ``[R, F_o, F_i]`` in
    the canonical layout, handed over in ``layout``.

    One autograd node per layer instead of some thirty views, slices and products, whose
    bookkeeping would cost more than the gathers. Backward takes the gradient back to rows once
    (``layout.to_rows``), gathers ``dW = A(q)ᵀ dout`` (Aᵀ is as sparse as A; autograd's own
    backward would scatter-add), and takes q's gradient from the row-wise dot products
    ``dvals[r, k] = ⟨dout[r], W[cols[r, k]]⟩`` (the bags of ``cols`` describe them for that)."""

    @staticmethod
    def forward(ctx, c: SparseConstants, layout: Layout, W0: torch.Tensor, q0: torch.Tensor,
                W1: torch.Tensor | None = None, q1: torch.Tensor | None = None):
        rows, W0, vals0_t = _term(c, layout.dims, W0, q0)
        saved = [W0, vals0_t, None, None]
        if W1 is not None:
            term, saved[2], saved[3] = _term(c, layout.dims, W1, q1)
            rows.add_(term)
        ctx.save_for_backward(*saved)
        ctx.constants, ctx.layout = c, layout
        return layout.from_rows(rows)

    @staticmethod
    @once_differentiable  # a clear error for double backward, which the gathers don't support
    def backward(ctx, grad):
        W0, vals0_t, W1, vals1_t = ctx.saved_tensors
        c, d = ctx.constants, ctx.layout.dims
        dout = ctx.layout.to_rows(grad)
        need = ctx.needs_input_grad
        dW0, dq0 = _term_grads(c, d, dout, W0, vals0_t, need[2], need[3])
        dW1, dq1 = _term_grads(c, d, dout, W1, vals1_t, need[4], need[5]) if W1 is not None else (None, None)
        return None, None, dW0, dq0, dW1, dq1


def _term(c: SparseConstants, d: Dims, W: torch.Tensor, q: torch.Tensor):
    """One term's rows ``A(q) W``, with the padded W and Aᵀ's values that backward needs."""
    n = c.cols.numel()
    W = W.reshape(W.shape[0], d.pairs)
    if padded(d.pairs) != d.pairs:  # O(2)'s odd field counts: see ROW_ALIGN
        W = F.pad(W, (0, padded(d.pairs) - d.pairs))
    vals = q @ c.values
    rows = F.embedding_bag(c.cols, W, per_sample_weights=vals[:n].view(c.cols.shape), mode="sum")
    return rows, W, vals[n:].view(c.rows_t.shape)


def _term_grads(c: SparseConstants, d: Dims, dout, W, vals_t, need_W: bool, need_q: bool):
    dW = dq = None
    if need_W:
        dW = F.embedding_bag(c.rows_t, dout, per_sample_weights=vals_t, mode="sum")[:, :d.pairs]
        dW = dW.reshape(W.shape[0], d.fields_out, d.fields_in)
    if need_q:
        dvals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dout, W, c.cols.view(-1), c.offsets, c.offset2bag, 0)
        dq = c.values[:, :c.cols.numel()] @ dvals
    return dW, dq
