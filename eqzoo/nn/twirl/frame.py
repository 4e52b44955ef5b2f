r"""The regular-frame path: out fields regular fields of a finite group, in fields permutation
fields (every convolution of a finite-group model).

Out component a of a regular field stands for a group element γ_a. Let S_g = ρ_in(g) ⊗ T(g)ᵀ act
on an out component's coefficients (in component, harmonic), so that (A_g W)_a = S_g W_{g⁻¹a}. In
the frame coordinates V_a = S_{γ_a}⁻¹ W_a this is (A_g V)_a = V_{g⁻¹a}: the group only permutes out
components, and the twirl is the |G| x |G| matrix C(q) = Σ_g q_g ρ_out(g) applied to V viewed as
``[d_out, everything else]``, so each pass reads the coefficients once. The layer keeps its
coefficients in this frame; W_a = S_{γ_a} V_a turns out component a's harmonics by γ_a
(``harmonic_actions`` [d_out, H, H] = T(γ_a)ᵀ, or on the pixels ``pixel_bases`` [d_out, k², H]:
ψ(γ_a⁻¹ x)) and permutes its in components by ρ_in(γ_a) (row indices (a, b) of W <- (a, b') of V:
``to_canonical``; back: ``to_frame``). S is orthogonal: a change of coordinates that keeps the
init's distribution, and for the 90-degree groups (a signed permutation) even Adam's steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ...kernels import permutation_indices
from .layout import Dims, Layout, product_into


@dataclass(frozen=True)
class Frame:
    """A layer's regular frame as tensors (see the module docstring)."""

    rho_out: torch.Tensor  # [m, d_out * d_out]
    uniform: torch.Tensor  # [d_out, d_out]: C at uniform q, the projection P
    harmonic_actions: torch.Tensor  # [d_out, H, H]
    pixel_bases: torch.Tensor  # [d_out, k * k, H]
    to_canonical: torch.Tensor  # [d_out * d_in]
    to_frame: torch.Tensor  # [d_out * d_in]
    gathers: dict = field(default_factory=dict, compare=False, repr=False)  # see _gather

    @staticmethod
    def of(ops, floats: dict, ints: dict) -> "Frame | None":
        """The frame of a layer's operators, or None where its fields have none."""
        r_out, r_in, T = ops.rho_out, ops.rho_in, ops.harmonic_action
        m, d_out = r_out.shape[:2]
        sigma_out, sigma_in = permutation_indices(r_out), permutation_indices(r_in)
        # regular: every (a, k) is linked by exactly one element; T orthogonal (rings' rotations, flips)
        if (sigma_out is None or sigma_in is None or m != d_out or not np.allclose(r_out.sum(0), 1)
                or not np.allclose(np.einsum("ghk,gjk->ghj", T, T), np.eye(T.shape[1]))):
            return None
        gamma = np.argmax(sigma_out == 0, axis=0)  # γ_a: the element taking component 0 to a
        d_in, H = r_in.shape[1], T.shape[1]
        to_canonical = np.array([a * d_in + sigma_in[gamma[a], b] for a in range(d_out) for b in range(d_in)])
        arrays = dict(rho_out=r_out.reshape(m, -1), uniform=r_out.mean(0),
                      harmonic_actions=T[gamma].transpose(0, 2, 1),
                      pixel_bases=np.einsum("ahk,kp->aph", T[gamma], ops.basis.reshape(H, -1)),
                      to_canonical=to_canonical, to_frame=np.argsort(to_canonical))
        return Frame(**{k: torch.tensor(v, **(ints if v.dtype.kind == "i" else floats)) for k, v in arrays.items()})

    def pixel_gather(self, d: Dims) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices between a layer's pixel rows, ordered by frame row (a, b') then field pair
        (o, i), and the filter's rows (o, a, i, b): ``(to_filter, to_frame)``."""
        def source(o, a, i, b):
            return (self.to_canonical[a * d.d_in + b] * d.fields_out + o) * d.fields_in + i
        return self._gather(("pixels", d.fields_out, d.fields_in), source, (d.fields_out, d.d_out, d.fields_in, d.d_in))

    def harmonic_gather(self, d: Dims) -> tuple[torch.Tensor, torch.Tensor]:
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

    def turned(self, rows: torch.Tensor, d: Dims) -> torch.Tensor:
        """Rows [(a b h), N] with out component a's harmonics turned by γ_a: [a, b, h, N]."""
        return torch.matmul(self.harmonic_actions[:, None], rows.reshape(d.d_out, d.d_in, d.harmonics, -1))

    def unturned(self, rows: torch.Tensor, d: Dims) -> torch.Tensor:
        """The inverse of :meth:`turned` (T is orthogonal), flattened to [d_out, (b h N)]."""
        return torch.matmul(self.harmonic_actions.transpose(1, 2)[:, None],
                            rows.reshape(d.d_out, d.d_in, d.harmonics, -1)).view(d.d_out, -1)

    def canonical(self, rows: torch.Tensor, d: Dims) -> torch.Tensor:
        """Frame coefficients [d_out, (b' h N)] -> canonical rows [(a b h), N]."""
        turned = self.turned(rows, d)
        return turned.view(d.d_out * d.d_in, -1).index_select(0, self.to_canonical).view(d.rows, -1)

    def framed(self, rows: torch.Tensor, d: Dims) -> torch.Tensor:
        """Canonical rows [(a b h), N] -> frame coefficients [d_out, (b' h N)]."""
        return self.unturned(rows.reshape(d.d_out * d.d_in, -1).index_select(0, self.to_frame), d)


@dataclass(frozen=True)
class FramePixelFilter(Layout):
    """Frame coefficients [d_out, (b' h N)] -> the pixel filter [(o a), (i b), x, y]."""

    dims: Dims
    frame: Frame

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        d, f = self.dims, self.frame
        kk = f.pixel_bases.shape[1]
        if kk == 1:  # ψ is one number per out component: scaled in the rearranging copy
            rows = rows.view(d.d_out * d.d_in, -1).index_select(0, f.to_canonical)
            rows = rows.view(d.d_out, d.d_in, d.fields_out, d.fields_in).permute(2, 0, 3, 1)
            return product_into(rows, f.pixel_bases.view(1, d.d_out, 1, 1)).view(-1, d.fields_in * d.d_in, 1, 1)
        # per (a, b'): the harmonics of all N field pairs turned to pixels, ψ(γ_a⁻¹ x), as [N, k²]
        # (BLAS reads the transposed operand in place), then one gather of rows of k² pixels from
        # the order (a, b', o, i) to the filter's (o, a, i, b): pixels, permutation and layout in two passes
        pixels = torch.matmul(rows.view(d.d_out, d.d_in, d.harmonics, -1).transpose(-1, -2),
                              f.pixel_bases.transpose(1, 2)[:, None])
        del rows  # the largest layers' intermediates are tens of MB: one at a time
        to_filter, _ = f.pixel_gather(d)
        k = math.isqrt(kk)
        return pixels.view(-1, kk).index_select(0, to_filter).view(-1, d.fields_in * d.d_in, k, k)

    def to_rows(self, grad: torch.Tensor) -> torch.Tensor:
        d, f = self.dims, self.frame
        kk = f.pixel_bases.shape[1]
        if kk == 1:
            grad = grad.reshape(d.fields_out, d.d_out, d.fields_in, d.d_in).permute(1, 3, 0, 2)
            rows = product_into(grad, f.pixel_bases.view(d.d_out, 1, 1, 1)).view(d.d_out * d.d_in, -1)
            return rows.index_select(0, f.to_frame).view(d.d_out, -1)
        _, to_frame = f.pixel_gather(d)
        pixels = grad.reshape(-1, kk).index_select(0, to_frame).view(d.d_out, d.d_in, d.pairs, kk)
        return torch.matmul(f.pixel_bases.transpose(1, 2)[:, None], pixels.transpose(-1, -2)).view(d.d_out, -1)


@dataclass(frozen=True)
class FrameHarmonicMatrix(Layout):
    """Frame coefficients [d_out, (b' h N)] -> the harmonic matrix [(a o), (b h i)]."""

    dims: Dims
    frame: Frame

    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        # harmonics turned per out component, then one gather of rows of F_i numbers from the order
        # (a, b', h, o) to the matrix's (a, o, b, h): the permutation and the layout in one pass
        d, f = self.dims, self.frame
        turned = f.turned(rows, d)
        del rows
        to_matrix, _ = f.harmonic_gather(d)
        return turned.view(-1, d.fields_in).index_select(0, to_matrix).view(d.d_out * d.fields_out, -1)

    def to_rows(self, grad: torch.Tensor) -> torch.Tensor:
        d, f = self.dims, self.frame
        _, to_frame = f.harmonic_gather(d)
        return f.unturned(grad.reshape(-1, d.fields_in).index_select(0, to_frame), d)


def layout(kind: str, dims: Dims, frame: Frame) -> Layout:
    return FramePixelFilter(dims, frame) if kind == "pixels" else FrameHarmonicMatrix(dims, frame)


class RegularTwirlFunction(torch.autograd.Function):
    r"""``C(q0) V0 + C(q1) V1`` (the second term optional), ``C(q) = Σ_g q_g ρ_out(g)``, for
    coefficients stored in the frame, handed over in ``layout``. Every product is one |G| x |G|
    matrix times the coefficients viewed as ``[d_out, everything else]``; q's gradient is
    ``dq_g = ⟨ρ_out(g), D Vᵀ⟩`` with D the gradient in the frame."""

    @staticmethod
    def forward(ctx, f: Frame, layout: Layout, W0: torch.Tensor, q0: torch.Tensor,
                W1: torch.Tensor | None = None, q1: torch.Tensor | None = None):
        n = f.uniform.shape[0]
        ctx.shape = W0.shape
        V0, C0 = W0.reshape(n, -1), (q0 @ f.rho_out).view(n, n)
        V1 = C1 = None
        if W1 is not None:
            V1, C1 = W1.reshape(n, -1), (q1 @ f.rho_out).view(n, n)
        ctx.save_for_backward(C0, V0, C1, V1)
        ctx.frame, ctx.layout = f, layout
        # the second term accumulated in place; no name for the result, so that from_rows can
        # free each intermediate as soon as the next exists
        return layout.from_rows(C0 @ V0 if V1 is None else (C0 @ V0).addmm_(C1, V1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        C0, V0, C1, V1 = ctx.saved_tensors
        f, d, need = ctx.frame, ctx.layout.dims, ctx.needs_input_grad
        D = ctx.layout.to_rows(grad)
        dV0 = dq0 = dV1 = dq1 = None
        if need[3]:
            dq0 = f.rho_out @ _products_of_rows(D, V0, d).view(-1)
        if V1 is not None and need[5]:
            dq1 = f.rho_out @ _products_of_rows(D, V1, d).view(-1)
        if V1 is not None and need[2] and need[4]:  # both from one product: D is read once
            dV = torch.cat([C0, C1], dim=1).T @ D
            dV0, dV1 = dV[:C0.shape[0]].view(ctx.shape), dV[C0.shape[0]:].view(ctx.shape)
        else:
            dV0 = (C0.T @ D).view(ctx.shape) if need[2] else None
            dV1 = (C1.T @ D).view(ctx.shape) if V1 is not None and need[4] else None
        return None, None, dV0, dq0, dV1, dq1


def _products_of_rows(D: torch.Tensor, V: torch.Tensor, d: Dims) -> torch.Tensor:
    """``D Vᵀ`` for two [d_out, M] matrices, as a batched product over M's d_in * H runs of
    F_o * F_i columns: a single [d_out, M] x [M, d_out] product leaves its few outputs without
    parallel work along its long inner dimension."""
    n, runs = D.shape[0], d.d_in * d.harmonics
    return torch.bmm(D.view(n, runs, -1).transpose(0, 1), V.view(n, runs, -1).permute(1, 2, 0)).sum(0)
