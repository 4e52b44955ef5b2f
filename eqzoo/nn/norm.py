"""Batch normalisation per field, on plain tensors.

Equivariance needs statistics that commute with ρ(g): the mean is taken only on the invariant
(trivial-irrep) part of each field and the variance is one number per field (ρ is orthogonal, so a
field's norm is invariant). For permutation fields this is exactly escnn's InnerBatchNorm and runs
as one fused ``F.batch_norm`` over ``[B, fields, d*H*W]``.

The running statistics follow ``nn.BatchNorm2d``: ``momentum=None`` is a cumulative average (to
recalibrate statistics after training), ``track_running_stats=False`` always uses batch statistics,
and ``reset_running_stats()`` clears them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .._buffers import ConstantBuffers
from ..kernels import invariant_basis
from ..likelihood import autocast_off
from .fields import is_permutation, single_repr


class _FieldStatsNorm(torch.autograd.Function):
    r"""Batch norm of general fields x [B, F, d, P] with batch statistics: the mean of field f is
    μ = Π m, the projection (Π = E Eᵀ, E [d, t] the invariant basis) of its per-channel means m,
    its variance is one number, v_f = mean over batch, components and pixels of (x - μ)²
    = mean_c(E[x_c²]) - mean_c(μ_c²), and y = (x - μ) s w + E b with s = (v + eps)^(-1/2).

    Written out because autograd's version keeps several activation-sized temporaries and runs
    a dozen passes over them. With x̂ = (x - μ) s and n = B P, the backward is

    .. math:: dx = s w \left(dy - Π\, \tfrac{1}{n} Σ_{B,P} dy - x̂\, \tfrac{1}{n d} Σ_{B,d,P} dy\, x̂\right),

    a per-channel affine map of dy and x (two passes), after two per-channel reductions (one
    fused pass). Also returns the statistics (mean [F, t], variance [F]) for the running averages."""

    @staticmethod
    def forward(ctx, xf, E, weight, bias, eps):
        with autocast_off(xf.device):  # statistics in E's precision: autocast would run the products in bf16
            n = xf.shape[0] * xf.shape[3]
            m = xf.mean(dim=(0, 3), dtype=E.dtype)  # [F, d]
            mean = m @ E  # [F, t]
            mu = mean @ E.T
            squares = torch.linalg.vector_norm(xf, dim=(0, 3), dtype=E.dtype).square_() / n  # E[x_c²], no temporary
            var = (squares - mu.square()).mean(1).clamp_min_(0)
            s = torch.rsqrt(var + eps)
            scale = s if weight is None else s * weight
            shift = -mu * scale[:, None]
            if bias is not None:
                shift = shift + bias @ E.T
            ctx.save_for_backward(xf, E, weight, mu, s)
            ctx.mark_non_differentiable(mean, var)
            return torch.addcmul(shift[None, :, :, None], xf, scale[None, :, None, None]), mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _mean, _var):
        xf, E, weight, mu, s = ctx.saved_tensors
        B, F_, d, P = xf.shape
        n = B * P
        # Σ dy and Σ dy x̂ per channel in one pass with no temporary: batch norm's own backward
        # reductions, given the channels' means and inverse deviations (the field's s)
        _, dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.reshape(B, F_ * d, P), xf.to(dy.dtype).reshape(B, F_ * d, P), None, None, None,
            mu.reshape(-1), s.repeat_interleave(d), True, 0.0, [False, True, True])
        sum_dy, dy_xhat = sum_dy.view(F_, d).to(E.dtype), dy_xhat.view(F_, d).to(E.dtype).sum(1)  # [F, d], [F]
        alpha = s if weight is None else s * weight
        k = dy_xhat / (n * d)
        gamma = -alpha * s * k
        delta = alpha[:, None] * (k[:, None] * s[:, None] * mu - (sum_dy / n) @ E @ E.T)
        dx = torch.addcmul(delta[None, :, :, None], xf, gamma[None, :, None, None])
        dx = dx.addcmul_(dy, alpha[None, :, None, None]).to(xf.dtype)  # (a bf16 input under autocast)
        dweight = dy_xhat if weight is not None and ctx.needs_input_grad[2] else None
        dbias = sum_dy @ E if ctx.needs_input_grad[3] else None
        return dx, None, dweight, dbias, None


class FieldBatchNorm2d(ConstantBuffers, nn.Module):
    """Batch norm of a FieldType's fields; the arguments are ``nn.BatchNorm2d``'s."""

    def __init__(self, field_type, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        rep = single_repr(field_type)
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
            raise ValueError(f"momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}")
        self.field_type = field_type
        self.num_fields, self.field_size = len(field_type), rep.size
        self.num_features = field_type.size
        self.eps, self.momentum, self.affine = eps, momentum, affine
        self.track_running_stats = track_running_stats
        self.permutation = is_permutation(rep)
        self._register_constant_buffers(**dd)
        t = 1 if self.permutation else self._invariant.shape[1]
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(self.num_fields, t, **dd))
            self.register_buffer("running_var", torch.ones(self.num_fields, **dd))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_fields, **dd))
            self.bias = nn.Parameter(torch.zeros(self.num_fields, t, **dd))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _constant_buffers(self, device=None, dtype=None) -> dict:
        basis = invariant_basis(single_repr(self.field_type))  # [d, t]: the invariant vectors
        return {"_invariant": torch.tensor(basis, dtype=dtype or torch.float32, device=device)}

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check(self, x):
        if torch.jit.is_tracing():  # a trace fixes the shapes: the check would only warn there
            return
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FieldBatchNorm2d expects [B, {self.num_features}, H, W] "
                             f"({self.num_fields} fields of size {self.field_size}), got {tuple(x.shape)}")

    def _momentum(self) -> float:
        """This step's weight of the batch in the running statistics (counting the batch, as
        nn.BatchNorm2d does): ``momentum``, or 1 / batches seen for the cumulative average."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, C, H, W = x.shape
        if x.numel() == 0:  # an empty batch (as nn.BatchNorm2d allows): nothing to normalise or learn from
            return x.clone()
        if torch.compiler.is_compiling():
            return self._channelwise(x)
        # (the view copies a channels_last input: one copy costs less on the CPU than a batch
        # norm that keeps the layout)
        if self.permutation:
            update = self.training and self.track_running_stats
            momentum = self._momentum() if update else 0.0
            running_mean = self.running_mean.view(-1) if update or not self._use_batch_stats() else None
            running_var = self.running_var if update or not self._use_batch_stats() else None
            y = F.batch_norm(x.reshape(B, self.num_fields, -1), running_mean, running_var, self.weight,
                             None if self.bias is None else self.bias.view(-1),
                             self._use_batch_stats(), momentum, self.eps)
            if torch.jit.is_tracing():  # (torch.jit.trace, the legacy ONNX exporter: no _unsafe_view)
                return y.reshape(B, C, H, W)
            # not a view of y: an in-place activation on a view would make autograd copy the
            # whole activation twice in backward (CopySlices); y is a temporary, so this is safe
            return torch.ops.aten._unsafe_view(y, (B, C, H, W))
        return self._general(x)

    def _with_running_stats(self, x):
        """Eval with running statistics: one per-channel affine map, fused."""
        return F.batch_norm(x, *(t if t is None else t.to(x.dtype) for t in self._per_channel()),
                            training=False, eps=self.eps)

    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Blend a batch's field statistics (variance over n numbers per field) into the running ones."""
        with torch.no_grad():
            momentum = self._momentum()
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype), momentum)

    def _general(self, x):
        if not self._use_batch_stats():
            return self._with_running_stats(x)
        B, C, H, W = x.shape
        xf = x.reshape(B, self.num_fields, self.field_size, H * W)
        # statistics in at least the module's precision (bf16 activations under autocast: float32)
        E = self._invariant.to(torch.promote_types(x.dtype, self._invariant.dtype))
        y, mean, var = _FieldStatsNorm.apply(xf, E, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, B * H * W * self.field_size)
        return y.view(B, C, H, W)

    def _channelwise(self, x):
        r"""The normalisation from per-channel statistics, for ``torch.compile``: inductor gives
        convolutions channels_last outputs, and turns the field views of the eager paths into
        scalar loops with an integer division per element. With the channels' means m_c and variances v_c, the
        field's mean is μ = Π m and its variance v = mean_c(v_c) + mean_c((m_c - μ_c)²)
        (Π is an orthogonal projection, and the law of total variance: no difference of large
        numbers); y = x s_c + shift_c keeps x's layout."""
        if not self._use_batch_stats():
            return self._with_running_stats(x)
        B, C, H, W = x.shape
        d = self.field_size
        E = self._invariant.to(torch.promote_types(x.dtype, self._invariant.dtype))
        xs = x.to(E.dtype)  # statistics in at least the module's precision, as _general
        var_c, m = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
        mean, var, scale, shift = self._from_channel_stats(m, var_c, E)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, B * H * W * d)
        y = torch.addcmul(shift.reshape(1, C, 1, 1), xs, scale.repeat_interleave(d).view(1, C, 1, 1))
        return y.to(x.dtype)

    def _from_channel_stats(self, m: torch.Tensor, var_c: torch.Tensor, E: torch.Tensor):
        """The field statistics (mean, var) and the per-field scale and per-channel shift of the
        normalisation, from the channels' means ``m`` and variances ``var_c`` [C]."""
        F_, d = self.num_fields, self.field_size
        m, var_c = m.view(F_, d), var_c.view(F_, d)
        # a permutation field keeps the average of its channels and one bias per field, a general
        # field the coordinates of its mean and bias in the invariant basis E
        mean = m.mean(1, keepdim=True) if self.permutation else m @ E
        mu = mean.expand(F_, d) if self.permutation else mean @ E.T
        var = (var_c + (m - mu).square()).mean(1)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mu * scale[:, None]
        if self.bias is not None:
            shift = shift + (self.bias.expand(F_, d) if self.permutation else self.bias @ E.T)
        return mean, var, scale, shift

    def _per_channel(self):
        """(mean, var, weight, bias) per channel, equal to this layer in eval mode."""
        d = self.field_size
        E = self._invariant.to(self.running_var.dtype)
        if self.permutation:
            mean = self.running_mean.view(-1).repeat_interleave(d)
            bias = self.bias.view(-1).repeat_interleave(d) if self.affine else None
        else:
            mean = (self.running_mean @ E.T).reshape(-1)
            bias = (self.bias @ E.T).reshape(-1) if self.affine else None
        var = self.running_var.repeat_interleave(d)
        weight = self.weight.repeat_interleave(d) if self.affine else None
        return mean, var, weight, bias

    @torch.no_grad()
    def export(self) -> nn.BatchNorm2d:
        """An ``nn.BatchNorm2d`` equal to this layer in eval mode (running statistics broadcast to
        channels). Training it further would no longer tie the channels of a field."""
        if not self.track_running_stats:
            raise ValueError("a FieldBatchNorm2d with track_running_stats=False has no nn.BatchNorm2d equivalent: "
                             "it normalises every batch with per-field statistics, nn.BatchNorm2d with per-channel "
                             "ones; export a model built with running statistics")
        mean, var, weight, bias = self._per_channel()
        bn = nn.BatchNorm2d(self.num_features, self.eps, self.momentum, self.affine,
                            device=var.device, dtype=var.dtype)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.num_batches_tracked.copy_(self.num_batches_tracked)
        if self.affine:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        return bn.train(self.training)

    def extra_repr(self) -> str:
        return (f"{self.num_fields} fields x {self.field_size}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
