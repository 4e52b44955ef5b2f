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

from ..kernels import invariant_basis
from .fields import is_permutation, single_repr


class FieldBatchNorm2d(nn.Module):
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
        self.register_buffer("_invariant", self._invariant_basis(**dd), persistent=False)
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

    def _invariant_basis(self, device=None, dtype=None) -> torch.Tensor:
        return torch.tensor(invariant_basis(single_repr(self.field_type)), dtype=dtype or torch.float32, device=device)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the invariant basis (a constant: after ``to_empty()`` its memory is garbage)."""
        self._invariant = self._invariant_basis(self._invariant.device, self._invariant.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        # to_empty() + load_state_dict() must give a working layer: the constant is rebuilt first
        self.init_non_persistent_buffers()
        super()._load_from_state_dict(*args, **kwargs)

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

    def _general(self, x):
        if not self._use_batch_stats():  # running statistics: one per-channel affine map, fused
            return F.batch_norm(x, *(t if t is None else t.to(x.dtype) for t in self._per_channel()),
                                training=False, eps=self.eps)
        B, C, H, W = x.shape
        E = self._invariant.to(x.dtype)
        xf = x.reshape(B, self.num_fields, self.field_size, H * W)
        mean = xf.mean(dim=(0, 3)) @ E  # [F, t]: reduced over batch and pixels first, no reordering copy
        mean_vec = (mean @ E.T)[None, :, :, None]
        var = (xf - mean_vec).pow(2).mean(dim=(0, 2, 3))
        n = B * H * W * self.field_size
        if self.training and self.track_running_stats:
            with torch.no_grad():
                momentum = self._momentum()
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype), momentum)
        # (x - m) s + b as one pass over the activations: x s + (b - m s)
        scale = torch.rsqrt(var + self.eps)
        shift = -mean_vec * scale[None, :, None, None]
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight[None, :, None, None] + (self.bias @ E.T)[None, :, :, None]
        return torch.addcmul(shift, xf, scale[None, :, None, None]).reshape(B, C, H, W)

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
