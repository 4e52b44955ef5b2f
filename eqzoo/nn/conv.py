r"""Partially equivariant convolution and linear layers on plain tensors.

The filter is built from two unconstrained band-limited kernels κ_0, κ_1 (see :mod:`eqzoo.kernels`)
with the λ-twirl and the uniform twirl P (the projection onto equivariant kernels):

.. math::
    A_λ κ = \sum_g w_g(λ)\; ρ_{out}(g)\, κ(g^{-1}\,\cdot)\, ρ_{in}(g)^{T}, \qquad
    κ_λ = A_λ κ_0 + (A_λ - P)\, κ_1 .

A_λ κ_0 alone spans the same kernels (the λ-twirl of the paper). κ_1, the *symmetry-breaking*
part, is there for the optimiser: in A_λ κ_0 the non-equivariant part of κ_0 gets a gradient of
the size of λ's distance from uniform, and an adaptive optimiser cannot scale it up, because the
same coordinates carry the equivariant part's far larger gradient. As a parameter of its own,
κ_1 (``weight_breaking``, only where λ is learnable, starting at 0) learns at the optimiser's
pace, and λ still decides how much of it the filter gets (none at uniform λ).

Each twirl is one sparse matrix (see :mod:`eqzoo.kernels`) per step, or, where the out fields
are regular fields of a finite group, one |G| x |G| matrix in the layer's regular frame (see
:class:`_Frame`); everything else is precomputed when the layer is built. In eval mode the
filter is cached until the weights, λ, the device or the dtype change.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..groups import group_of
from ..kernels import (TwirlOperators, permutation_indices, quadrature_size, resolved_basis, ring_harmonics,
                       twirl_operators)
from ..likelihood import GroupLikelihood, autocast_enabled, autocast_off
from .fields import single_repr


@dataclass(frozen=True)
class _Dims:
    """The sizes of a layer's coefficients ``W [d_out * d_in * H, F_out, F_in]``: components of one
    out / in field, ring harmonics, out / in fields."""

    d_out: int
    d_in: int
    harmonics: int
    fields_out: int
    fields_in: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(d_out, d_in, H, F_out, F_in)``: the coefficients viewed per component and field."""
        return self.d_out, self.d_in, self.harmonics, self.fields_out, self.fields_in

    @property
    def rows(self) -> int:
        return self.d_out * self.d_in * self.harmonics

    @property
    def pairs(self) -> int:
        return self.fields_out * self.fields_in


@dataclass(frozen=True)
class _PixelFilter:
    """The twirled coefficients as the pixel filter ``[(o a), (i b), x, y] = Σ_h (A W)[a b h, o i]
    ψ_h(x, y)``, channels grouped per field as escnn's (field, component)."""

    dims: _Dims

    def from_rows(self, rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        d, k = self.dims, basis.shape[-1]
        return self._arranged(basis.view(d.harmonics, k * k).T @ rows.view(d.d_out * d.d_in, d.harmonics, -1))

    def to_rows(self, grad: torch.Tensor, basis: torch.Tensor, width: int) -> torch.Tensor:
        d, k = self.dims, basis.shape[-1]
        rows = self._pixel_rows(grad, width, k).view(d.d_out * d.d_in, k * k, -1)
        return (basis.view(d.harmonics, k * k) @ rows).view(d.rows, -1)

    def from_frame(self, rows: torch.Tensor, f: "_Frame") -> torch.Tensor:
        d, kk = self.dims, f.pixel_bases.shape[1]
        k = int(math.isqrt(kk))
        if kk == 1:  # ψ is one number per out component: scaled in the rearranging copy
            rows = rows.view(d.d_out * d.d_in, -1).index_select(0, f.to_canonical)
            rows = rows.view(d.d_out, d.d_in, d.fields_out, d.fields_in).permute(2, 0, 3, 1)
            return _product_into(rows, f.pixel_bases.view(1, d.d_out, 1, 1)).view(-1, d.fields_in * d.d_in, 1, 1)
        # per (a, b'): the harmonics of all N field pairs turned to pixels, ψ(γ_a⁻¹ x), as [N, k²]
        # (BLAS reads the transposed operand in place), then one gather of rows of k² pixels from
        # the order (a, b', o, i) to the filter's (o, a, i, b): pixels, permutation and layout in two passes
        pixels = torch.matmul(rows.view(d.d_out, d.d_in, d.harmonics, -1).transpose(-1, -2),
                              f.pixel_bases.transpose(1, 2)[:, None])
        del rows  # the largest layers' intermediates are tens of MB: one at a time
        to_filter, _ = f.pixel_gather(d)
        return pixels.view(-1, kk).index_select(0, to_filter).view(-1, d.fields_in * d.d_in, k, k)

    def to_frame(self, grad: torch.Tensor, f: "_Frame") -> torch.Tensor:
        d, kk = self.dims, f.pixel_bases.shape[1]
        if kk == 1:
            grad = grad.reshape(d.fields_out, d.d_out, d.fields_in, d.d_in).permute(1, 3, 0, 2)
            rows = _product_into(grad, f.pixel_bases.view(d.d_out, 1, 1, 1)).view(d.d_out * d.d_in, -1)
            return rows.index_select(0, f.to_frame).view(d.d_out, -1)
        _, to_frame = f.pixel_gather(d)
        pixels = grad.reshape(-1, kk).index_select(0, to_frame).view(d.d_out, d.d_in, d.pairs, kk)
        return torch.matmul(f.pixel_bases.transpose(1, 2)[:, None], pixels.transpose(-1, -2)).view(d.d_out, -1)

    def _arranged(self, filt: torch.Tensor) -> torch.Tensor:
        """[(a b), xy, (o i) (+ padding)] -> the filter [(o a), (i b), x, y]."""
        d = self.dims
        k = int(math.isqrt(filt.shape[1]))
        filt = filt[:, :, :d.pairs].view(d.d_out, d.d_in, k, k, d.fields_out, d.fields_in)
        return filt.permute(4, 0, 5, 1, 2, 3).reshape(d.fields_out * d.d_out, d.fields_in * d.d_in, k, k)

    def _pixel_rows(self, grad: torch.Tensor, width: int, k: int) -> torch.Tensor:
        """The filter's gradient [(o a), (i b), x, y] as rows [(a b x y), width]."""
        d = self.dims
        grad = grad.view(d.fields_out, d.d_out, d.fields_in, d.d_in, k, k).permute(1, 3, 4, 5, 0, 2)
        return _rows_of(grad, d.d_out * d.d_in * k * k, width)


@dataclass(frozen=True)
class _HarmonicMatrix:
    """The twirled coefficients as the matrix ``[(a o), (b h i)]`` that
    :meth:`PEConv2d._conv_in_harmonics` multiplies the harmonic responses of the input with."""

    dims: _Dims

    def from_rows(self, rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        d = self.dims
        out = rows[:, :d.pairs].view(d.d_out, d.d_in, d.harmonics, d.fields_out, d.fields_in)
        return out.permute(0, 3, 1, 2, 4).reshape(d.d_out * d.fields_out, d.d_in * d.harmonics * d.fields_in)

    def to_rows(self, grad: torch.Tensor, basis: torch.Tensor, width: int) -> torch.Tensor:
        d = self.dims
        grad = grad.view(d.d_out, d.fields_out, d.d_in, d.harmonics, d.fields_in).permute(0, 2, 3, 1, 4)
        return _rows_of(grad, d.rows, width)

    def from_frame(self, rows: torch.Tensor, f: "_Frame") -> torch.Tensor:
        # harmonics turned per out component, then one gather of rows of F_i numbers from the order
        # (a, b', h, o) to the matrix's (a, o, b, h): the permutation and the layout in one pass
        d = self.dims
        turned = f.turned(rows, d)
        del rows
        to_matrix, _ = f.harmonic_gather(d)
        return turned.view(-1, d.fields_in).index_select(0, to_matrix).view(d.d_out * d.fields_out, -1)

    def to_frame(self, grad: torch.Tensor, f: "_Frame") -> torch.Tensor:
        d = self.dims
        _, to_frame = f.harmonic_gather(d)
        return f.unturned(grad.reshape(-1, d.fields_in).index_select(0, to_frame), d)


class _TwirledCoefficients(torch.autograd.Function):
    r"""The sum of twirled coefficients ``Σ_j A(q_j) W_j`` of a layer (one term for a strict layer,
    two for κ_λ), handed over in the layout the convolution consumes (a :class:`_PixelFilter` or a
    :class:`_HarmonicMatrix`).

    Each ``W_j`` is ``[R, F_o, F_i]``: the R coefficients (a, b, h) of a field pair (rows) for the
    N = F_o * F_i field pairs (o, i) (columns), so every product moves whole contiguous rows. The
    twirl's values are ``vals = q @ values`` (A's then Aᵀ's), and row r of ``A W`` is
    ``Σ_k vals[r, k] W[cols[r, k]]``: an ``embedding_bag`` sum with per-sample weights. The terms
    are summed as rows, so the layout's conversion (for the pixel filter, a matmul with the
    harmonic basis and a permutation) runs once per layer, whatever the number of terms.

    One autograd node per layer instead of some thirty views, slices and products: per step their
    bookkeeping cost more than the gathers. Backward takes the gradient back to rows once (the
    layout's ``to_rows``), gathers ``dW_j = A(q_j)ᵀ dout`` (Aᵀ is as sparse as A; autograd's own
    backward would scatter-add), and takes q_j's gradient from the row-wise dot products
    ``dvals[r, k] = ⟨dout[r], W_j[cols[r, k]]⟩`` (the bags of ``cols``, ``offsets`` and
    ``offset2bag`` of :class:`_Constants`, describe them for that).
    """

    @staticmethod
    def forward(ctx, c: "_Constants", layout: "_PixelFilter | _HarmonicMatrix", *terms: torch.Tensor):
        N, n = layout.dims.pairs, c.cols.numel()
        rows, saved = None, []
        for W, q in zip(terms[::2], terms[1::2]):  # W_0, q_0, W_1, q_1, ...
            W = W.reshape(W.shape[0], N)
            if N % _ROW_ALIGN:  # O(2)'s odd field counts: pad, see _ROW_ALIGN
                W = F.pad(W, (0, _padded(N) - N))
            vals = q @ c.values
            saved += [W, vals[n:].view(c.rows_t.shape)]
            term = F.embedding_bag(c.cols, W, per_sample_weights=vals[:n].view(c.cols.shape), mode="sum")
            rows = term if rows is None else rows.add_(term)
        ctx.save_for_backward(*saved)
        ctx.constants, ctx.layout = c, layout
        return layout.from_rows(rows, c.basis)

    @staticmethod
    @once_differentiable  # a clear error for double backward, which the gathers don't support
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        c, layout = ctx.constants, ctx.layout
        d = layout.dims
        dout = layout.to_rows(grad, c.basis, saved[0].shape[1])
        grads = [None, None]
        for j, (W, vals_t) in enumerate(zip(saved[::2], saved[1::2])):
            dW = dq = None
            if ctx.needs_input_grad[2 + 2 * j]:
                dW = F.embedding_bag(c.rows_t, dout, per_sample_weights=vals_t, mode="sum")[:, :d.pairs]
                dW = dW.reshape(W.shape[0], d.fields_out, d.fields_in)
            if ctx.needs_input_grad[3 + 2 * j]:
                dvals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    dout, W, c.cols.view(-1), c.offsets, c.offset2bag, 0)
                dq = c.values[:, :c.cols.numel()] @ dvals
            grads += [dW, dq]
        return tuple(grads)


class _RegularTwirl(torch.autograd.Function):
    r"""κ_λ's coefficients for a layer stored in its regular frame (see :class:`_Frame`):

    .. math:: κ_λ = C(q) V_0 + (C(q) - C(u)) V_1, \qquad C(q) = \sum_g q_g ρ_{out}(g),

    i.e. A_λ κ_0 + (A_λ - P) κ_1 with ``V_1`` (κ_1) optional, handed over in ``layout``. Every
    product is one |G| x |G| matrix times the coefficients viewed as ``[d_out, everything else]``,
    so each pass reads them once; the λ gradient is ``dq_g = ⟨ρ_out(g), D (V_0 + V_1)ᵀ⟩`` with D
    the gradient in the frame."""

    @staticmethod
    def forward(ctx, f: "_Frame", layout, q: torch.Tensor, V0: torch.Tensor, V1: torch.Tensor | None):
        n = f.uniform.shape[0]
        ctx.shape = V0.shape
        V0 = V0.reshape(n, -1)
        V1 = None if V1 is None else V1.reshape(n, -1)
        C = (q @ f.rho_out).view(n, n)
        ctx.save_for_backward(C, V0, V1)
        ctx.frame, ctx.layout = f, layout
        # (C - P) V1 accumulated in place: no pass for V0 + V1; no name for the result, so that
        # from_frame can free each intermediate as soon as the next exists
        return layout.from_frame(C @ V0 if V1 is None else (C @ V0).addmm_(C - f.uniform, V1), f)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        C, V0, V1 = ctx.saved_tensors
        f = ctx.frame
        D = ctx.layout.to_frame(grad, f)
        dq = dV0 = dV1 = None
        if ctx.needs_input_grad[2]:
            dC = _products_of_rows(D, V0, ctx.layout.dims)
            if V1 is not None:
                dC += _products_of_rows(D, V1, ctx.layout.dims)
            dq = f.rho_out @ dC.view(-1)
        if V1 is not None and ctx.needs_input_grad[4]:  # both from one product: D is read once
            dV = torch.cat([C, C - f.uniform], dim=1).T @ D
            dV0, dV1 = dV[:C.shape[0]].view(ctx.shape), dV[C.shape[0]:].view(ctx.shape)
        elif ctx.needs_input_grad[3]:
            dV0 = (C.T @ D).view(ctx.shape)
        return None, None, dq, dV0, dV1


def _products_of_rows(D: torch.Tensor, V: torch.Tensor, d: _Dims) -> torch.Tensor:
    """``D Vᵀ`` for two [d_out, M] matrices, as a batched product over M's d_in * H runs of
    F_o * F_i columns: a single [d_out, M] x [M, d_out] product runs several times slower (its
    long inner dimension leaves the few outputs without parallel work)."""
    n, runs = D.shape[0], d.d_in * d.harmonics
    return torch.bmm(D.view(n, runs, -1).transpose(0, 1), V.view(n, runs, -1).permute(1, 2, 0)).sum(0)


@contextlib.contextmanager
def _tracing_paused():
    """Suspend TorchScript tracing: what is computed inside is recorded as a constant."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


# The twirl's gathers and row dot products run several times slower on rows that start off a
# 64-byte boundary (measured: 6.6 ms against 1.3 ms for 1176 rows of 1369 vs 1376 floats), so rows
# of F_o * F_i coefficients are padded to a multiple of this many floats when they need it.
_ROW_ALIGN = 16


def _padded(n: int) -> int:
    return -(-n // _ROW_ALIGN) * _ROW_ALIGN


def _rows_of(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``t`` (any strides, F_o * F_i numbers per row in its last two dims) copied into a
    contiguous [rows, width] tensor, zero beyond its F_o * F_i columns: one copy, padded or not."""
    n = t.shape[-1] * t.shape[-2]
    out = t.new_empty(rows, width)
    out[:, n:].zero_()
    out[:, :n].view(t.shape).copy_(t)
    return out


def _product_into(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` (any strides) as a new contiguous tensor: the product and the copy in one pass."""
    if torch.compiler.is_compiling():  # out= arguments don't trace
        return (t * scale).contiguous()
    return torch.mul(t, scale, out=t.new_empty(t.shape))


@dataclass(frozen=True)
class _Frame:
    r"""The regular frame of a layer whose out fields are regular fields of a finite group and
    whose in fields are permutation fields (every convolution of a finite-group model).

    Out component a of a regular field stands for a group element γ_a. Let S_g = ρ_in(g) ⊗ T(g)ᵀ
    act on an out component's coefficients (in component, harmonic), so that
    (A_g W)_a = S_g W_{g⁻¹a}. In the frame coordinates V_a = S_{γ_a}⁻¹ W_a this is
    (A_g V)_a = V_{g⁻¹a}: the group only permutes out components, and the twirl is the |G| x |G|
    matrix C(q) = Σ_g q_g ρ_out(g) applied to V as ``[d_out, everything else]``. The layer keeps
    its coefficients in this frame; W_a = S_{γ_a} V_a turns out component a's harmonics by γ_a
    (``harmonic_actions`` [d_out, H, H] = T(γ_a)ᵀ, or on the pixels ``pixel_bases`` [d_out, k², H]:
    ψ(γ_a⁻¹ x)) and permutes its in components by ρ_in(γ_a) (row indices (a, b) of W <- (a, b')
    of V: ``to_canonical``; back: ``to_frame``). S is orthogonal: a change of coordinates that
    keeps the init's distribution; for the 90-degree groups (a signed permutation) even Adam's steps."""

    rho_out: torch.Tensor  # [m, d_out * d_out]
    uniform: torch.Tensor  # [d_out, d_out]: C at uniform q, the projection P
    harmonic_actions: torch.Tensor  # [d_out, H, H]
    pixel_bases: torch.Tensor  # [d_out, k * k, H]
    to_canonical: torch.Tensor  # [d_out * d_in]
    to_frame: torch.Tensor  # [d_out * d_in]
    gathers: dict = field(default_factory=dict, compare=False, repr=False)  # see _gather

    def pixel_gather(self, d: _Dims) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices between a layer's pixel rows, ordered by frame row (a, b') then field pair
        (o, i), and the filter's rows (o, a, i, b): ``(to_filter, to_frame)``."""
        def source(o, a, i, b):
            return (self.to_canonical[a * d.d_in + b] * d.fields_out + o) * d.fields_in + i
        return self._gather(("pixels", d.fields_out, d.fields_in), source, (d.fields_out, d.d_out, d.fields_in, d.d_in))

    def harmonic_gather(self, d: _Dims) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices between a layer's rows of F_i coefficients, ordered (a, b', h, o), and the
        harmonic matrix's rows (a, o, b, h): ``(to_matrix, to_frame)``."""
        def source(a, o, b, h):
            return (self.to_canonical[a * d.d_in + b] * d.harmonics + h) * d.fields_out + o
        return self._gather(("harmonics", d.fields_out, d.fields_in), source, (d.d_out, d.fields_out, d.d_in, d.harmonics))

    def _gather(self, key, source, sizes) -> tuple[torch.Tensor, torch.Tensor]:
        """``source`` (the source row of each target row, given the target's indices over
        ``sizes``) and its inverse as int32 index tensors, made once per key. (a, b') is
        ``to_canonical[(a, b)]``. int32: half the memory of int64, and the gathers run faster."""
        if key not in self.gathers:
            grids = torch.meshgrid(*(torch.arange(n, device=self.to_canonical.device) for n in sizes), indexing="ij")
            forward = source(*grids).reshape(-1)
            inverse = torch.empty_like(forward)
            inverse[forward] = torch.arange(forward.numel(), device=forward.device)  # a permutation's inverse
            gathers = forward.int(), inverse.int()
            if torch.compiler.is_compiling():
                return gathers
            self.gathers[key] = gathers
        return self.gathers[key]

    def turned(self, rows: torch.Tensor, d: _Dims) -> torch.Tensor:
        """Rows [(a b h), N] with out component a's harmonics turned by γ_a: [a, b, h, N]."""
        return torch.matmul(self.harmonic_actions[:, None], rows.reshape(d.d_out, d.d_in, d.harmonics, -1))

    def unturned(self, rows: torch.Tensor, d: _Dims) -> torch.Tensor:
        """The inverse of :meth:`turned` (T is orthogonal), flattened to [d_out, (b h N)]."""
        return torch.matmul(self.harmonic_actions.transpose(1, 2)[:, None],
                            rows.reshape(d.d_out, d.d_in, d.harmonics, -1)).view(d.d_out, -1)

    def canonical(self, rows: torch.Tensor, d: _Dims) -> torch.Tensor:
        """Frame coefficients [d_out, (b' h N)] -> canonical rows [(a b h), N]."""
        turned = self.turned(rows, d)
        return turned.view(d.d_out * d.d_in, -1).index_select(0, self.to_canonical).view(d.rows, -1)

    def framed(self, rows: torch.Tensor, d: _Dims) -> torch.Tensor:
        """Canonical rows [(a b h), N] -> frame coefficients [d_out, (b' h N)]."""
        return self.unturned(rows.reshape(d.d_out * d.d_in, -1).index_select(0, self.to_frame), d)


def _frame_arrays(ops: TwirlOperators) -> dict | None:
    """The arrays of :class:`_Frame` for a layer's operators, or None where it has no regular frame."""
    r_out, r_in, T = ops.rho_out, ops.rho_in, ops.harmonic_action
    m, d_out = r_out.shape[:2]
    sigma_out, sigma_in = permutation_indices(r_out), permutation_indices(r_in)
    # regular: every (a, k) is linked by exactly one element; T orthogonal (rings' rotations, flips)
    if (sigma_out is None or sigma_in is None or m != d_out or not np.allclose(r_out.sum(0), 1)
            or not np.allclose(np.einsum("ghk,gjk->ghj", T, T), np.eye(T.shape[1]))):
        return None
    gamma = np.argmax(sigma_out == 0, axis=0)  # γ_a: the element taking component 0 to a
    d_in = r_in.shape[1]
    to_canonical = np.array([a * d_in + sigma_in[gamma[a], b] for a in range(d_out) for b in range(d_in)])
    H = T.shape[1]
    basis = ops.basis.reshape(H, -1)
    return dict(rho_out=r_out.reshape(m, -1), uniform=r_out.mean(0), harmonic_actions=T[gamma].transpose(0, 2, 1),
                pixel_bases=np.einsum("ahk,kp->aph", T[gamma], basis),
                to_canonical=to_canonical, to_frame=np.argsort(to_canonical))


@dataclass(frozen=True)
class _Constants:
    """A layer's operators as tensors: the harmonic basis [H, k, k], the invariant bias basis
    [d_out, t], the twirl values per quadrature point (A's [R, K] then Aᵀ's [R, K_t], flattened,
    so that one matmul gives both), A's pattern ``cols`` [R, K], Aᵀ's ``rows_t`` [R, K_t], the
    bags of ``cols`` (``offsets`` [R], ``offset2bag`` [R * K]) for the λ gradient, and the
    regular frame (None where the fields have none)."""

    basis: torch.Tensor
    bias_basis: torch.Tensor
    values: torch.Tensor
    cols: torch.Tensor
    rows_t: torch.Tensor
    offsets: torch.Tensor
    offset2bag: torch.Tensor
    frame: _Frame | None


_CONSTANTS: dict = {}


def _constants_of(ops: TwirlOperators, dtype: torch.dtype, device: torch.device) -> _Constants:
    """``ops`` as tensors in ``dtype`` on ``device``, made once and shared by every layer with the
    same operators (most layers of a network: the D8 twirl values alone are ~10 MB per 3x3 layer).
    Cast from the float64 operators, so ``.double()`` layers are exact; kept for the process."""
    key = (id(ops), dtype, device)
    entry = _CONSTANTS.get(key)
    if entry is None:
        sp = ops.sparse
        m, R, K = sp.values.shape
        values = np.concatenate([sp.values.reshape(m, -1), sp.values_t.reshape(m, -1)], axis=1)
        floats, ints = dict(dtype=dtype, device=device), dict(dtype=torch.int64, device=device)
        bags = torch.arange(R, **ints)
        frame = _frame_arrays(ops)
        if frame is not None:
            frame = _Frame(**{k: torch.tensor(v, **(ints if v.dtype.kind == "i" else floats)) for k, v in frame.items()})
        entry = (ops, _Constants(torch.tensor(ops.basis, **floats), torch.tensor(ops.invariant_out, **floats),
                                 torch.tensor(values, **floats), torch.tensor(sp.cols, **ints),
                                 torch.tensor(sp.rows_t, **ints), bags * K, bags.repeat_interleave(K), frame))
        if not torch.compiler.is_compiling():
            _CONSTANTS[key] = entry  # holding ops keeps id(ops) from being reused
    return entry[1]


class _Twirled(nn.Module):
    """Shared machinery of PEConv2d and PELinear: parameters, twirl, eval cache, export."""

    def __init__(self, in_type, out_type, kernel_size: int, dilation: int, bias: bool,
                 likelihood: GroupLikelihood | None, basis: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rep_in, rep_out = single_repr(in_type, "in_type"), single_repr(out_type, "out_type")
        if in_type.gspace != out_type.gspace:
            raise ValueError(f"in_type and out_type live on different gspaces: {in_type.gspace.name} "
                             f"vs {out_type.gspace.name}")
        self.group = group_of(in_type)
        if likelihood is None:
            likelihood = GroupLikelihood(self.group, **dd)
        elif not isinstance(likelihood, GroupLikelihood):
            raise TypeError(f"likelihood must be a GroupLikelihood or None, got {type(likelihood).__name__}")
        elif likelihood.group != self.group:
            raise ValueError(f"likelihood is over {likelihood.group} but the fields are over {self.group}")
        self.likelihood = likelihood
        self.in_type, self.out_type = in_type, out_type
        self.in_channels, self.out_channels = in_type.size, out_type.size
        self.kernel_size, self.dilation = kernel_size, dilation
        self.basis = basis = resolved_basis(basis, self.group)
        # the operators are host-side constants (numpy, and escnn's torch code for the rings): built
        # on the CPU whatever device context the layer is built under, e.g. torch.device('meta')
        with torch.device("cpu"):
            harm = ring_harmonics(kernel_size, dilation, basis)
            self.n_rot = quadrature_size(self.group, rep_in, rep_out, harm, likelihood.out_bandlimit)
            ops = twirl_operators(self.group, rep_in, rep_out, kernel_size, dilation, self.n_rot, basis)
        self.basis_fingerprint = ops.fingerprint
        self._ops = ops  # its tensors: see _constants
        d_in, d_out = rep_in.size, rep_out.size
        self._dims = _Dims(d_out, d_in, harm.size, len(out_type), len(in_type))
        # Coefficients: rows (out component, in component, ring harmonic), then (out field, in
        # field): the layout in which the twirl moves whole contiguous rows, and from which the
        # pixel filter is one batched matmul and one cheap permutation away; with a regular frame
        # (see _Frame) the rows are that frame's coordinates, and state_dict() converts them to
        # this canonical layout (see canonical_weight). 3-D on purpose: it has no spatial
        # layout, so channels_last conversions leave it alone.
        self.weight = nn.Parameter(torch.empty(d_out * d_in * harm.size, len(out_type), len(in_type), **dd))
        # κ_1 of the module docstring: a parameter where λ learns; a buffer (zero unless loaded)
        # where it is frozen, so that strict and learnt models have the same state_dict and a
        # learnt checkpoint loads into a frozen-λ model as the same function
        breaking = torch.empty_like(self.weight)
        if likelihood.learnable:
            self.weight_breaking = nn.Parameter(breaking)
        else:
            self.register_buffer("weight_breaking", breaking)
        self._breaking_state = None  # (version key, κ_1 is non-zero): see _uses_breaking
        if bias and ops.invariant_out.shape[1] > 0:
            self.bias = nn.Parameter(torch.zeros(len(out_type), ops.invariant_out.shape[1], **dd))
        else:
            self.register_parameter("bias", None)
        self._cache = None
        self.reset_parameters()
        self._prepare_constants()

    def _prepare_constants(self) -> None:
        """Make the layer's constant tensors (operators, the regular frame's gathers) now, in eager
        mode: under ``torch.compile`` whatever is not cached yet is built inside the graph, again
        at every step (for the gathers, index arithmetic and a permutation per layer)."""
        if self.weight.is_meta or torch.compiler.is_compiling():
            return
        frame = self._constants().frame
        if frame is not None:
            dims = self._dims_of(self.weight)
            frame.pixel_gather(dims)
            frame.harmonic_gather(dims)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """κ_0 starts equivariant (see :meth:`_init_weight` for its scale): its non-equivariant part
        starts at 0 and grows only where the data asks for it. Then the twirl gives κ_0 for any λ,
        so the layer starts exactly equivariant even though a learnable λ starts peaked at the
        identity (see :data:`eqzoo.likelihood.INIT_PEAK`); with a random non-equivariant part,
        λ's gradient would be a random projection of it, and λ would drift towards arbitrary
        subgroups. κ_1 and the bias start at 0."""
        self._cache = None
        if self.bias is not None:
            self.bias.zero_()
        self.weight_breaking.zero_()
        if self.weight.is_meta:  # no values to scale: to_empty() then reset_parameters() will
            return
        m = self._ops.sparse.values.shape[0]
        uniform = torch.full((m,), 1.0 / m, device=self.weight.device)
        self._init_weight(uniform)
        self.weight.copy_(self._projected(self.weight, uniform))

    def _init_weight(self, uniform: torch.Tensor) -> None:
        """He init of the filter *at uniform λ* (the twirl keeps only part of κ_0's energy): the
        equivariant filter has std sqrt(2 / fan_in), as a convolution followed by a ReLU wants."""
        nn.init.normal_(self.weight)
        # The twirl maps every (in field, out field) pair's coefficients alike, so a block of at
        # most 8 x 8 field pairs gives the filter's std (synthesising all of it dominated build time)
        filt = self._twirled(_PixelFilter, uniform, self.weight[:, :8, :8])
        fan_in = self.in_channels * self.kernel_size**2
        std = float(filt.std()) if filt.numel() > 1 else 0.0
        if std > 0:
            self.weight.mul_(math.sqrt(2.0 / fan_in) / std)

    def _projected(self, w: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        """The equivariant part of coefficients ``w`` in the weight's own layout: the twirl at
        uniform λ (quadrature weights ``uniform``), an orthogonal projection."""
        frame = self._constants(w.dtype, w.device).frame
        if frame is not None:
            return (frame.uniform @ w.reshape(frame.uniform.shape[0], -1)).view_as(w)
        return self.twirled_coefficients(uniform, w)

    def _dims_of(self, w: torch.Tensor) -> _Dims:
        """The layer's sizes for coefficients ``w`` of this layout with any number of field pairs."""
        return _Dims(self._dims.d_out, self._dims.d_in, self._dims.harmonics, *w.shape[1:])

    def twirled_coefficients(self, q: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """The coefficients ``w`` twirled with quadrature weights ``q``, both in the canonical layout
        ``[d_out * d_in * H, F_out, F_in]`` of :meth:`canonical_weight` (default: the weight's). A
        one-hot ``q`` at element g gives g's action on the coefficients, an orthogonal map."""
        w = self.canonical_weight() if w is None else w
        dims = self._dims_of(w)
        c = self._constants(w.dtype, w.device)
        matrix = _TwirledCoefficients.apply(c, _HarmonicMatrix(dims), w, q.to(w.dtype))
        return self._as_rows(matrix, *w.shape[1:])

    def kernel_coefficients(self) -> torch.Tensor:
        """The coefficients of the layer's filter κ_λ in the canonical layout (with gradients)."""
        return self._as_rows(self._filter(_HarmonicMatrix), self._dims.fields_out, self._dims.fields_in)

    def canonical_weight(self, w: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients ``w`` (default: the weight) in the canonical layout: rows (out component,
        in component, ring harmonic) of every (out field, in field) pair, as ``state_dict()``
        holds them. Layers with a regular frame (see :class:`_Frame`) store their parameters in
        that frame, where λ's twirl is one small matrix product; this converts (differentiably)."""
        w = self.weight if w is None else w
        frame = self._constants(w.dtype, w.device).frame
        if frame is None:
            return w
        dims = self._dims_of(w)
        return frame.canonical(w.reshape(dims.d_out, -1), dims).view(w.shape)

    def _stored(self, w: torch.Tensor) -> torch.Tensor:
        """Canonical coefficients in the weight's own layout (the inverse of :meth:`canonical_weight`)."""
        frame = self._constants(w.dtype, w.device).frame
        if frame is None:
            return w
        dims = self._dims_of(w)
        return frame.framed(w, dims).view(w.shape)

    def _as_rows(self, matrix: torch.Tensor, fields_out: int, fields_in: int) -> torch.Tensor:
        """A :class:`_HarmonicMatrix` ``[(a o), (b h i)]`` back in the canonical layout."""
        d = self._dims
        out = matrix.view(d.d_out, fields_out, d.d_in, d.harmonics, fields_in)
        return out.permute(0, 2, 3, 1, 4).reshape(d.rows, fields_out, fields_in)

    def _filter(self, layout) -> torch.Tensor:
        """κ_λ = A_λ κ_0 + (A_λ - P) κ_1 in ``layout`` (see :meth:`_twirled`)."""
        q = self.likelihood.kernel_weights(self.n_rot)
        return self._twirled(layout, q, self.weight, self.weight_breaking if self._uses_breaking() else None)

    def _uses_breaking(self) -> bool:
        """Whether the filter needs the κ_1 term: always where it is trained; where it is a buffer
        (frozen λ) only if it is non-zero, checked once per change, so that a strict layer pays
        for one twirl, not two."""
        b = self.weight_breaking
        if isinstance(b, nn.Parameter) or b.is_meta or torch.compiler.is_compiling():
            return True
        key = (b.data_ptr(), b._version, b.device)
        if self._breaking_state is None or self._breaking_state[0] != key:
            self._breaking_state = (key, bool(b.any()))
        return self._breaking_state[1]

    def _constants(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> _Constants:
        """The operators' tensors in ``dtype`` on ``device`` (default: the weight's)."""
        return _constants_of(self._ops, dtype or self.weight.dtype, device or self.weight.device)

    def _twirled(self, layout, q: torch.Tensor, w: torch.Tensor, breaking: torch.Tensor | None = None) -> torch.Tensor:
        """``A(q) w + (A(q) - P) breaking`` for coefficients in the weight's own layout
        [d_out * d_in * H, F_out, F_in] and quadrature weights q [m], in ``layout``:
        :class:`_PixelFilter` gives the filter [C_out, C_in, k, k], :class:`_HarmonicMatrix` the
        matrix [(out component, out field), (in component, harmonic, in field)]."""
        dims = self._dims_of(w)
        c = self._constants(w.dtype, w.device)
        q = q.to(w.dtype)
        if c.frame is not None:
            return _RegularTwirl.apply(c.frame, layout(dims), q, w, breaking)
        terms = [w, q] + ([] if breaking is None else [breaking, q - 1.0 / q.numel()])
        return _TwirledCoefficients.apply(c, layout(dims), *terms)

    def _expanded_bias(self):
        if self.bias is None:
            return None
        return (self.bias @ self._constants(self.bias.dtype).bias_basis.T).reshape(-1)

    def _coefficients_and_bias(self, layout=_PixelFilter):
        """The twirled coefficients in ``layout`` (see :meth:`_twirled`) and the bias, in full precision."""
        with autocast_off(self.weight.device):
            return self._filter(layout), self._expanded_bias()

    def filter_and_bias(self):
        """The current filter and bias as plain tensors (recomputed, with gradients)."""
        return self._coefficients_and_bias(_PixelFilter)

    def _cache_key(self):
        ts = [t for t in (self.weight, self.weight_breaking, self.likelihood.coefficients, self.bias) if t is not None]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in ts)

    def _current(self):
        if not self.training and torch.jit.is_tracing():
            # TorchScript tracing (torch.jit.trace, the legacy ONNX exporter) of an eval-mode layer
            # records the filter as a constant, computed with the tracer paused: the twirl's custom
            # autograd function cannot be traced, and an inference graph needs only the filter
            with _tracing_paused():
                return self._cached()
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.weight, self.weight_breaking, self.bias, self.likelihood.coefficients)
            if p is not None)
        if self.training or needs_grad or torch.compiler.is_compiling() or self.weight.is_meta:
            self._cache = None
            return self.filter_and_bias()
        return self._cached()

    def _cached(self):
        """The filter and bias from the eval cache, recomputed when the weights or λ changed."""
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key,) + tuple(self.filter_and_bias())
        return self._cache[1], self._cache[2]

    def _check_input(self, x: torch.Tensor, spatial: bool):
        if torch.jit.is_tracing():  # a trace fixes the shapes: the check would only warn there
            return
        want = 4 if spatial else 2
        if x.dim() != want or x.shape[1] != self.in_channels:
            shape = "[B, C, H, W]" if spatial else "[B, C]"
            raise ValueError(f"{type(self).__name__} expects {shape} with C = {self.in_channels} "
                             f"({len(self.in_type)} fields of size {self._dims.d_in}), got shape {tuple(x.shape)}")
        # as nn.Conv2d: the input's dtype must be the weights' (outside autocast, which casts);
        # casting the filter to the input would silently run a float32 model in float16
        autocast = autocast_enabled(x.device)
        if (x.dtype != self.weight.dtype and not autocast) or not x.is_floating_point():
            hint = " (images as uint8: convert with x.float() / 255)" if x.dtype == torch.uint8 else ""
            raise RuntimeError(f"{type(self).__name__}: input dtype {x.dtype} does not match the weights' "
                               f"{self.weight.dtype}{hint}; cast the input (x.to({self.weight.dtype})) or the "
                               "model (model.to(dtype)), or run under torch.autocast")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in ("weight", "weight_breaking"):  # saved in the canonical layout, whatever the storage
            t = destination.get(prefix + name)
            if t is not None:
                destination[prefix + name] = self.canonical_weight(t if keep_vars else t.detach())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # saved before κ_1 existed: that filter is A_λ κ_0, i.e. κ_1 = 0
        key = prefix + "weight_breaking"
        if key not in state_dict and prefix + "weight" in state_dict:
            state_dict[key] = torch.zeros_like(self.weight_breaking)
        for name in ("weight", "weight_breaking"):  # canonical layout -> storage; bad shapes and dtypes
            t = state_dict.get(prefix + name)  # are left for load_state_dict to report
            if isinstance(t, torch.Tensor) and t.shape == self.weight.shape and t.is_floating_point():
                state_dict[prefix + name] = self._stored(t)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache = None  # moved / cast: rebuild the cached filter
        out = super()._apply(fn, recurse)
        self._prepare_constants()  # for the new device and dtype
        return out

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module first: fail here, with what to do instead,
        # rather than deep in the compiler
        raise RuntimeError(
            f"{type(self).__name__} does not compile to TorchScript: its filter comes from a custom autograd "
            "function (the twirl) and a Python-side cache. Script the exported model, which computes the same "
            "function in eval mode: torch.jit.script(eqzoo.export(model)); or trace the model in eval mode: "
            "torch.jit.trace(model.eval(), example_input) records the current filters as constants.")


class PEConv2d(_Twirled):
    r"""Steerable convolution with a learnt degree of equivariance.

    Args:
        in_type, out_type: escnn FieldTypes over the same gspace, each made of copies of one
            representation. Tensors are plain ``[B, C, H, W]`` with channels grouped per field.
        kernel_size, stride, padding, dilation, bias: as :class:`torch.nn.Conv2d` (square kernels).
        likelihood: the :class:`~eqzoo.GroupLikelihood` to use (shared by passing the same object),
            or ``None`` for a fresh one owned by this layer. A frozen uniform likelihood
            (``learnable=False``) gives the strict steerable convolution.
        basis: ``"auto"`` (default: ``"complete"`` for C1, C2, C4, D1, D2, D4, else
            ``"antialiased"``), ``"antialiased"`` (escnn's smooth ring harmonics) or ``"complete"``
            (spans every k x k kernel); see :data:`eqzoo.kernels.BASES`.
    """

    def __init__(self, in_type, out_type, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = True, likelihood: GroupLikelihood | None = None,
                 basis: str = "auto", device=None, dtype=None):
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        super().__init__(in_type, out_type, kernel_size, dilation, bias, likelihood, basis,
                         device=device, dtype=dtype)
        self.stride, self.padding = stride, padding
        self._patch_projections = {}  # input size, dtype, device -> see _patch_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, spatial=True)
        if self.training and self._harmonic_domain_pays(x):
            return self._conv_in_harmonics(x)
        filt, bias = self._current()
        filt = filt.to(x.dtype) if not autocast_enabled(x.device) else filt
        bias = bias.to(filt.dtype) if bias is not None else None
        return F.conv2d(x, filt, bias, self.stride, self.padding, self.dilation)

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        reach = self.dilation * (self.kernel_size - 1)
        h, w = ((n + 2 * self.padding - reach - 1) // self.stride + 1 for n in x.shape[2:])
        return h, w

    def _harmonic_domain_pays(self, x: torch.Tensor) -> bool:
        """Whether :meth:`_conv_in_harmonics` is the cheaper way to train on this input: the batch
        has fewer output pixels than the layer has output channels (so building the pixel filter
        and its gradient would cost more than the convolution), and the input map is small enough
        for its patch projection (P input pixels per channel) to stay cheap next to the matmul."""
        h, w = self._output_size(x)
        return 0 < x.shape[0] * h * w < self.out_channels and 4 * x.shape[2] * x.shape[3] <= self.out_channels

    def _patch_projection(self, x: torch.Tensor) -> torch.Tensor:
        """The matrix [P, H * L] taking one channel's P input pixels to ⟨ψ_h, patch_l⟩ for the L
        output positions: unfolding and projecting on the ring harmonics in one small operator
        (built by unfolding the P one-hot images), so both directions are a single matmul."""
        key = (x.shape[2], x.shape[3], x.dtype, x.device)
        if self._patch_projections.get(key) is None:
            P = x.shape[2] * x.shape[3]
            one_hot = torch.eye(P, dtype=torch.float64, device="cpu").view(P, 1, *x.shape[2:])
            patches = F.unfold(one_hot, self.kernel_size, self.dilation, self.padding, self.stride)
            basis = torch.from_numpy(self._ops.basis).reshape(self._ops.basis.shape[0], -1)
            proj = torch.einsum("hx,pxl->phl", basis, patches).reshape(P, -1).to(x.device, x.dtype)
            if torch.compiler.is_compiling():
                return proj
            self._patch_projections[key] = proj
        return self._patch_projections[key]

    def _conv_in_harmonics(self, x: torch.Tensor) -> torch.Tensor:
        r"""The convolution computed against the ring harmonics instead of the pixels:

        .. math:: y_{o a}(p) = \sum_{b, h, i} W'_{a b h}[o, i]\, \langle ψ_h, x_{i b}|_{p} \rangle,

        one matmul of the harmonic responses of the input patches with the twirled coefficients.
        Taken in training where it pays (see :meth:`_harmonic_domain_pays`: deep stages, small
        images), where building the pixel filter and its gradient costs more memory traffic than
        the convolution itself.
        """
        coeff, bias = self._coefficients_and_bias(_HarmonicMatrix)  # [(a o), (b h i)]
        if not autocast_enabled(x.device):
            coeff = coeff.to(x.dtype)
        d = self._dims
        d_o, d_i, H, F_o, F_i = d.d_out, d.d_in, d.harmonics, d.fields_out, d.fields_in
        B = x.shape[0]
        proj = self._patch_projection(x)
        L = proj.shape[1] // H
        resp = x.reshape(B * self.in_channels, -1) @ proj  # [(n i b), (h l)]
        # ordered (b, h, i) like the coefficients' columns; the in-field index stays innermost in
        # both, so the coefficients' reordering copies runs of F_i numbers (the order
        # [(b h i), (a o)] copied with a stride-F_i inner loop, 8x slower)
        resp = resp.view(B, F_i, d_i, H, L).permute(0, 4, 2, 3, 1).reshape(B * L, d_i * H * F_i)
        y = resp @ coeff.T
        y = y.view(B, L, d_o, F_o).permute(0, 3, 2, 1).reshape(B, F_o * d_o, L)  # channels (o, a)
        if bias is not None:
            y = y + bias.to(y.dtype)[:, None]
        return y.view(B, F_o * d_o, *self._output_size(x))

    @torch.no_grad()
    def export(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function (the current filter, frozen)."""
        filt, bias = self.filter_and_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                         self.padding, self.dilation, bias=bias is not None,
                         device=filt.device, dtype=filt.dtype)
        conv.weight.copy_(filt)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, group={self.group.spec}, basis={self.basis}")


class PELinear(_Twirled):
    """Linear map between fields (``[B, C]`` tensors) with a learnt degree of equivariance, e.g.
    a head from the last fields to trivial class logits (invariant while λ is uniform)."""

    def __init__(self, in_type, out_type, bias: bool = True, likelihood: GroupLikelihood | None = None,
                 device=None, dtype=None):
        super().__init__(in_type, out_type, 1, 1, bias, likelihood, device=device, dtype=dtype)

    def _init_weight(self, uniform: torch.Tensor) -> None:
        """``nn.Linear``'s init, U(±1/sqrt(in_features)), of the coefficients, which
        :meth:`reset_parameters` then projects: a classifier's logits start as small as timm's.
        (He-scaling the projected filter, as the convolutions do, made an invariant head's logits
        6x larger than an ``nn.Linear``'s on pooled ReLU features: their positive means add up
        within each field, where an unconstrained filter's random signs cancel them.)"""
        bound = 1.0 / math.sqrt(self.in_channels)
        nn.init.uniform_(self.weight, -bound, bound)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, spatial=False)
        filt, bias = self._current()
        filt = filt.to(x.dtype) if not autocast_enabled(x.device) else filt
        bias = bias.to(filt.dtype) if bias is not None else None
        return F.linear(x, filt[:, :, 0, 0], bias)

    @torch.no_grad()
    def export(self) -> nn.Linear:
        filt, bias = self.filter_and_bias()
        lin = nn.Linear(self.in_channels, self.out_channels, bias=bias is not None,
                        device=filt.device, dtype=filt.dtype)
        lin.weight.copy_(filt[:, :, 0, 0])
        if bias is not None:
            lin.bias.copy_(bias)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_channels}, out_features={self.out_channels}, group={self.group.spec}"
