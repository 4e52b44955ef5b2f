r"""Partially equivariant convolution and linear layers on plain tensors.

The filter is the λ-twirl of an unconstrained band-limited kernel (see :mod:`eqzoo.kernels`):

.. math:: κ_λ = \sum_g w_g(λ)\; ρ_{out}(g)\, κ_0(g^{-1}\,\cdot)\, ρ_{in}(g)^{T},

computed on the coefficients with one batched contraction per step; everything else is
precomputed when the layer is built. In eval mode the filter is cached until the weights, λ, the
device or the dtype change.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..groups import group_of
from ..kernels import permutation_indices, quadrature_size, ring_harmonics, twirl_operators
from ..likelihood import GroupLikelihood
from .fields import single_repr


def _pair_rows(rho_out, rho_in, H: int):
    """Row indices [m, H*d_out*d_in] into coefficients viewed ``[(h, a, b), (o, i)]`` that apply
    ρ_out(g) ⊗ ρ_in(g) to the pair (a, b) as the gather (σ_g(a), τ_g(b)), and those of the
    inverse permutations; ``(None, None)`` unless every ρ(g) is a permutation matrix."""
    po, pi = permutation_indices(rho_out), permutation_indices(rho_in)
    if po is None or pi is None:
        return None, None
    pairs = torch.from_numpy(po[:, :, None] * rho_in.shape[1] + pi[:, None, :]).flatten(1).long()
    offsets = torch.arange(H)[:, None] * pairs.shape[1]
    rows = (offsets + pairs[:, None, :]).flatten(1)
    inverse = (offsets + torch.argsort(pairs, dim=1)[:, None, :]).flatten(1)
    return rows, inverse


class _PermutationTwirl(torch.autograd.Function):
    r"""``out[:, p] = Σ_g T_gᵀ w[:, idx_g(p)]`` for permutations ``idx_g`` of the channel pairs p.

    ``w`` is laid out ``[H, P, N]`` (harmonic, pair of field components, pair of fields): each
    gather moves contiguous rows of N, and each ``T_g`` is one plain ``[H, H] @ [H, P*N]`` matmul.
    One gather and one matmul per group element, accumulated in place: no tensor m times the
    weights is ever held (autograd's gather would keep one and scatter-add into another). The
    backward gathers with the inverse permutations.
    """

    @staticmethod
    def forward(ctx, w, T, rows, inv_rows):  # w [H, P, N], T [m, H, H], rows/inv_rows [m, H*P]
        # rows index the [H*P, N] view: a gather of whole contiguous rows is the fast one
        w = w.contiguous()
        H, P, N = w.shape
        rows_of = w.view(H * P, N)
        out = torch.zeros_like(w)
        for g in range(T.shape[0]):
            out.view(H, -1).addmm_(T[g].T, rows_of.index_select(0, rows[g]).view(H, -1))
        ctx.save_for_backward(w, T, inv_rows)
        return out

    @staticmethod
    def backward(ctx, dout):
        # one gather of dout per g serves both gradients:
        #   dw[:, s] = Σ_g T_g dout[:, inv_g(s)]   and   dT_g = Σ_s w[:, s] dout[:, inv_g(s)]ᵀ
        w, T, inv_rows = ctx.saved_tensors
        H, P, N = w.shape
        d_rows = dout.contiguous().view(H * P, N)
        need_w, need_T = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dw = torch.zeros_like(w) if need_w else None
        dT = torch.empty_like(T) if need_T else None
        w_flat = w.view(H, -1)
        for g in range(T.shape[0]):
            y = d_rows.index_select(0, inv_rows[g]).view(H, -1)
            if need_w:
                dw.view(H, -1).addmm_(T[g], y)
            if need_T:
                torch.mm(w_flat, y.T, out=dT[g])
        return dw, dT, None, None


class _Twirled(nn.Module):
    """Shared machinery of PEConv2d and PELinear: parameters, twirl, eval cache, export."""

    def __init__(self, in_type, out_type, kernel_size: int, dilation: int, bias: bool,
                 likelihood: GroupLikelihood | None):
        super().__init__()
        rep_in, rep_out = single_repr(in_type, "in_type"), single_repr(out_type, "out_type")
        if in_type.gspace != out_type.gspace:
            raise ValueError(f"in_type and out_type live on different gspaces: {in_type.gspace.name} "
                             f"vs {out_type.gspace.name}")
        self.group = group_of(in_type)
        if likelihood is None:
            likelihood = GroupLikelihood(self.group)
        elif not isinstance(likelihood, GroupLikelihood):
            raise TypeError(f"likelihood must be a GroupLikelihood or None, got {type(likelihood).__name__}")
        elif likelihood.group != self.group:
            raise ValueError(f"likelihood is over {likelihood.group} but the fields are over {self.group}")
        self.likelihood = likelihood
        self.in_type, self.out_type = in_type, out_type
        self.in_channels, self.out_channels = in_type.size, out_type.size
        self.kernel_size, self.dilation = kernel_size, dilation
        harm = ring_harmonics(kernel_size, dilation)
        self.n_rot = quadrature_size(self.group, rep_in, rep_out, harm, likelihood.out_bandlimit)
        ops = twirl_operators(self.group, rep_in, rep_out, kernel_size, dilation, self.n_rot)
        self.basis_fingerprint = ops.fingerprint
        # float64 so that .double() layers are exact; cast to the weights' dtype when used
        f64 = dict(dtype=torch.float64)
        self.register_buffer("_basis", torch.tensor(ops.basis, **f64), persistent=False)
        self.register_buffer("_harmonic_action", torch.tensor(ops.harmonic_action, **f64), persistent=False)
        self.register_buffer("_rho_in", torch.tensor(ops.rho_in, **f64), persistent=False)
        self.register_buffer("_rho_out", torch.tensor(ops.rho_out, **f64), persistent=False)
        self.register_buffer("_bias_basis", torch.tensor(ops.invariant_out, **f64), persistent=False)
        # Regular fields of finite groups: ρ(g) are permutations and the twirl is a gather.
        rows, inverse = _pair_rows(ops.rho_out, ops.rho_in, harm.size)
        self.register_buffer("_pair_index", rows, persistent=False)
        self.register_buffer("_pair_inverse", inverse, persistent=False)
        d_in, d_out = rep_in.size, rep_out.size
        self._shape = (len(out_type), d_out, len(in_type), d_in, harm.size)
        # Coefficients per (out channel, in channel, ring harmonic). 3-D on purpose: it has no
        # spatial layout, so channels_last conversions leave it alone.
        self.weight = nn.Parameter(torch.empty(self.out_channels, self.in_channels, harm.size))
        if bias and ops.invariant_out.shape[1] > 0:
            self.bias = nn.Parameter(torch.zeros(len(out_type), ops.invariant_out.shape[1]))
        else:
            self.register_parameter("bias", None)
        self._cache = None
        # for groups with reflections, the dense twirl factors the flip out (see _synthesize);
        # False computes the plain sum over the whole grid (kept for tests)
        self.factor_flips = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """He init of the filter *at uniform λ* (the twirl keeps only part of κ_0's energy)."""
        nn.init.normal_(self.weight)
        m = self._harmonic_action.shape[0]
        uniform = torch.full((m,), 1.0 / m, device=self.weight.device)
        # The twirl maps every (out field, in field) pair's coefficients alike, so a block of at
        # most 8 x 8 field pairs gives the filter's std (synthesising all of it dominated build time)
        filt = self._synthesize(uniform, self.weight.view(self._shape)[:8, :, :8])
        fan_in = self.in_channels * self.kernel_size**2
        std = float(filt.std()) if filt.numel() > 1 else 0.0
        if std > 0:
            self.weight.mul_(math.sqrt(2.0 / fan_in) / std)
        if self.bias is not None:
            self.bias.zero_()
        self._cache = None

    def _synthesize(self, q: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        """Filter [C_out, C_in, k, k] for quadrature weights q [m] of the coefficients ``w``
        [F_out, d_out, F_in, d_in, H] (default: the layer's weight)."""
        w = self.weight.view(self._shape) if w is None else w
        k = self.kernel_size
        F_o, d_o, F_i, d_i, H = w.shape
        if self._pair_index is not None:
            # W'[a, b] = Σ_g q_g (W T_g)[σ_g(a), τ_g(b)], on w laid out [h, (a b), (o i)]
            wt = w.permute(4, 1, 3, 0, 2).reshape(H, d_o * d_i, F_o * F_i)
            Tq = self._harmonic_action.to(w.dtype) * q.to(w.dtype)[:, None, None]
            coeff = _PermutationTwirl.apply(wt, Tq, self._pair_index, self._pair_inverse)
            filt = self._basis.to(w.dtype).reshape(H, k * k).T @ coeff.view(H, -1)  # [xy, (a b o i)]
            filt = filt.view(k, k, d_o, d_i, F_o, F_i).permute(4, 2, 5, 3, 0, 1)
            return filt.reshape(F_o * d_o, F_i * d_i, k, k)
        # Dense ρ (band-limited fields of O(2)/SO(2)), coefficients laid out [a, h, (o i b)].
        T, r_in, r_out = (t.to(w.dtype) for t in (self._harmonic_action, self._rho_in, self._rho_out))
        wa = w.permute(1, 4, 0, 2, 3).reshape(d_o, H, -1)
        q = q.to(w.dtype)
        if self.factor_flips and self.group.has_flip:
            # K_(1,θ) = K_(0,θ) K_(1,0) (g -> K_g is a representation), so with the grid flip-major
            # Σ_{s,θ} q(s,θ) K_(s,θ) W = Σ_θ K_(0,θ) [q(0,θ) W + q(1,θ) K_(1,0) W]:
            # the dense ρ products run over the rotations only, half of the grid.
            n = T.shape[0] // 2
            flipped = self._dense_sum(wa[None], T[n:n + 1], r_in[n:n + 1], r_out[n:n + 1]).view_as(wa)
            x = q[:n, None, None, None] * wa + q[n:, None, None, None] * flipped
            coeff = self._dense_sum(x, T[:n], r_in[:n], r_out[:n])
        else:
            coeff = self._dense_sum(wa[None] * q[:, None, None, None], T, r_in, r_out)
        coeff = coeff.view(d_o, H, F_o, F_i, d_i)
        filt = torch.einsum("akoic,kxy->oaicxy", coeff, self._basis.to(w.dtype))
        return filt.reshape(F_o * d_o, F_i * d_i, k, k)

    @staticmethod
    def _dense_sum(x, T, r_in, r_out):
        """Σ_g ρ_out(g) (X_g T_g) ρ_in(g)ᵀ for coefficients X_g laid out [g, a, h, (o i b)]. With g
        and a leading, the last product and the sum over g are one matmul over (g, a).
        Returns [a', (k o i c)]."""
        m, d_o, d_i = T.shape[0], r_out.shape[1], r_in.shape[1]
        x = torch.matmul(T.transpose(1, 2)[:, None], x)  # h -> k: [g, a, k, (o i b)]
        x = torch.bmm(x.reshape(m, -1, d_i), r_in.transpose(1, 2))  # b -> c: [g, (a k o i), c]
        return r_out.permute(1, 0, 2).reshape(d_o, m * d_o) @ x.view(m * d_o, -1)  # Σ_g, a -> a'

    def _expanded_bias(self):
        if self.bias is None:
            return None
        return (self.bias @ self._bias_basis.to(self.bias.dtype).T).reshape(-1)

    def filter_and_bias(self):
        """The current filter and bias as plain tensors (recomputed, with gradients)."""
        with torch.autocast(self.weight.device.type, enabled=False):
            q = self.likelihood.kernel_weights(self.n_rot)
            return self._synthesize(q), self._expanded_bias()

    def _cache_key(self):
        ts = [self.weight, self.likelihood.coefficients] + ([self.bias] if self.bias is not None else [])
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in ts)

    def _current(self):
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for p in (self.weight, self.bias, self.likelihood.coefficients) if p is not None)
        if self.training or needs_grad or torch.compiler.is_compiling():
            self._cache = None
            return self.filter_and_bias()
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key,) + tuple(self.filter_and_bias())
        return self._cache[1], self._cache[2]

    def _check_input(self, x: torch.Tensor, spatial: bool):
        want = 4 if spatial else 2
        if x.dim() != want or x.shape[1] != self.in_channels:
            shape = "[B, C, H, W]" if spatial else "[B, C]"
            raise ValueError(f"{type(self).__name__} expects {shape} with C = {self.in_channels} "
                             f"({len(self.in_type)} fields of size {self._shape[3]}), got shape {tuple(x.shape)}")

    def _apply(self, fn, recurse=True):
        self._cache = None  # moved / cast: rebuild the cached filter
        return super()._apply(fn, recurse)


class PEConv2d(_Twirled):
    r"""Steerable convolution with a learnt degree of equivariance.

    Args:
        in_type, out_type: escnn FieldTypes over the same gspace, each made of copies of one
            representation. Tensors are plain ``[B, C, H, W]`` with channels grouped per field.
        kernel_size, stride, padding, dilation, bias: as :class:`torch.nn.Conv2d` (square kernels).
        likelihood: the :class:`~eqzoo.GroupLikelihood` to use (shared by passing the same object),
            or ``None`` for a fresh one owned by this layer. A frozen uniform likelihood
            (``learnable=False``) gives the strict steerable convolution.
    """

    def __init__(self, in_type, out_type, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = True, likelihood: GroupLikelihood | None = None):
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        super().__init__(in_type, out_type, kernel_size, dilation, bias, likelihood)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, spatial=True)
        filt, bias = self._current()
        filt = filt.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else filt
        bias = bias.to(filt.dtype) if bias is not None else None
        return F.conv2d(x, filt, bias, self.stride, self.padding, self.dilation)

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
                f"stride={self.stride}, padding={self.padding}, group={self.group.spec}")


class PELinear(_Twirled):
    """Linear map between fields (``[B, C]`` tensors) with a learnt degree of equivariance, e.g.
    a head from the last fields to trivial class logits (invariant while λ is uniform)."""

    def __init__(self, in_type, out_type, bias: bool = True, likelihood: GroupLikelihood | None = None):
        super().__init__(in_type, out_type, 1, 1, bias, likelihood)

    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, spatial=False)
        filt, bias = self._current()
        filt = filt.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else filt
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
