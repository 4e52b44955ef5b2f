"""Field batch norm with statistics over all processes of a distributed run.

:class:`~eqzoo.nn.FieldBatchNorm2d` is not a torch ``_BatchNorm``, so neither
``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` nor timm's ``convert_sync_batchnorm`` touches
it: under DDP each process would normalise with the statistics of its own part of the batch.
:func:`convert_sync_batchnorm` converts both kinds. In training, a :class:`SyncFieldBatchNorm2d`
sums each channel's count, sum and squared deviation over the process group (differentiable
all-reduces, so every process's loss reaches every process's input as in one process on the
whole batch) and forms the field statistics from them as the layer does on one process; outside
a process group, and in eval mode, it is the plain layer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .norm import FieldBatchNorm2d

__all__ = ["SyncFieldBatchNorm2d", "convert_sync_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the gradient of every process's loss reaches every input (the
    backward is the same sum)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    return _AllReduceSum.apply(t, group)


class SyncFieldBatchNorm2d(FieldBatchNorm2d):
    """A :class:`FieldBatchNorm2d` whose training statistics are those of the global batch."""

    process_group = None  # None: the default group

    def _synced(self) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._synced():
            return super().forward(x)
        self._check(x)  # an empty batch still takes part in the collectives (the others wait for it)
        B, C, H, W = x.shape
        d = self.field_size
        E = self._invariant.to(torch.promote_types(x.dtype, self._invariant.dtype))
        xs = x.to(E.dtype)
        count = torch.full((1,), float(B * H * W), dtype=E.dtype, device=x.device)
        sums = _all_reduce(torch.cat([xs.sum((0, 2, 3)), count]), self.process_group)
        n = sums[-1].clamp_min(1)
        m = sums[:C] / n  # channel means of the global batch
        # the squared deviations around the global means: two passes, no difference of large numbers
        var_c = _all_reduce((xs - m.view(1, C, 1, 1)).square().sum((0, 2, 3)), self.process_group) / n
        mean, var, scale, shift = self._from_channel_stats(m, var_c, E)  # as on one process
        if self.track_running_stats:
            self._update_running_stats(mean, var, int(sums[-1].detach().item()) * d)
        y = torch.addcmul(shift.reshape(1, C, 1, 1), xs, scale.repeat_interleave(d).view(1, C, 1, 1))
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``module`` with every batch norm synchronised over ``process_group`` (default: the default
    group): torch's ``_BatchNorm`` layers by ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, and
    every :class:`FieldBatchNorm2d` made a :class:`SyncFieldBatchNorm2d` in place (same parameters,
    buffers and state_dict). Call it before wrapping the model in DDP, as torch's."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if isinstance(m, FieldBatchNorm2d):
            m.__class__ = SyncFieldBatchNorm2d  # the subclass adds behaviour only, no state
            m.process_group = process_group
    return module
