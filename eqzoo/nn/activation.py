"""Nonlinearities and pooling on plain tensors of fields.

Permutation fields (regular fields of finite groups) commute with anything applied channel by
channel, so ReLU and max-pooling are used as they are. The band-limited fields of O(2)/SO(2) are
Fourier coefficients of a function on the group, stored irrep by irrep (ψ_0, the reflection's
sign, then 2-d blocks of frequency 1, 2, ...). Three nonlinearities for them (``NONLINEARITIES``):

- ``"fourier"`` (:class:`FourierReLU`): sample that function on a grid of the group, apply the
  ReLU there and project back (escnn's FourierPointwise idea). Exactly equivariant to the grid's
  elements, which include the 90-degree rotations and the reflections, approximately to the rest
  of the group; it handles 32 samples per 14-channel field.
- ``"norm"`` (:class:`NormReLU`): each non-trivial irrep block x_j is scaled by
  relu(|x_j| - b_j) / |x_j| with a learnt threshold b_j, the trivial components go through a
  ReLU. Exactly equivariant to all of O(2): |x_j| is invariant.
- ``"gated"`` (:class:`GatedReLU`): each field's invariant component x_0 gates the others,
  x_j sigmoid(x_0), and goes through a ReLU itself. Exactly equivariant, no parameters.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .._buffers import ConstantBuffers
from ..groups import group_of
from ..likelihood import autocast_enabled, autocast_off
from ..validate import NONLINEARITIES
from .fields import is_permutation, single_repr


# The samples are made and used a chunk of fields at a time, about this many numbers (1 MB in
# float32): a chunk's samples must stay in the cores' caches from one product to the next, where
# one pass over the whole tensor writes them to memory (and, on the CPU, page-faults in a fresh
# buffer) and reads them back; large maps are bound by that traffic. A GPU, or a compiler, takes
# it in one go.
_CHUNK_NUMBERS = 1 << 18


def _rows_per_chunk(n: int, row_numbers: int, device: torch.device) -> int:
    """How many of n rows of ``row_numbers`` samples each make a chunk (all of them off the CPU)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return n
    return max(1, _CHUNK_NUMBERS // max(row_numbers, 1))


def _sampled_relu(x: torch.Tensor, sample: torch.Tensor, project: torch.Tensor,
                  keep_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``project @ relu(sample @ x)`` for x [n, d, pixels], chunk by chunk (see _CHUNK_NUMBERS),
    and the ReLU's mask (samples > 0, [n, N, pixels]) where asked for."""
    n, _, P = x.shape
    step = _rows_per_chunk(n, sample.shape[0] * P, x.device)
    if step >= n:
        samples = torch.matmul(sample, x)
        mask = samples > 0 if keep_mask else None
        return torch.matmul(project, samples.relu_()), mask
    out = torch.empty_like(x)
    mask = torch.empty(n, sample.shape[0], P, dtype=torch.bool, device=x.device) if keep_mask else None
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        samples = torch.bmm(sample.expand(rows.stop - i, -1, -1), x[rows])
        if mask is not None:
            torch.gt(samples, 0, out=mask[rows])
        torch.bmm(project.expand(rows.stop - i, -1, -1), samples.relu_(), out=out[rows])
    return out, mask


# The sampled ReLU in training is one opaque operator (a torch.library custom op) with its own
# backward: it keeps only the ReLU's mask for backward (one byte per sample), where autograd would
# keep the samples themselves, 2.3 times the activations in float32, the largest part of an O(2)
# model's training memory; and torch.compile calls it as it is, chunks and all, where tracing it
# would make one pass over the whole samples tensor per elementwise step.
@torch.library.custom_op("eqzoo::sampled_relu", mutates_args=(),
                         schema="(Tensor x, Tensor sample, Tensor project) -> (Tensor, Tensor)")
def _sampled_relu_train(x, sample, project):
    """``project @ relu(sample @ x)`` for x [n, d, pixels] and the ReLU's mask [n, N, pixels]."""
    return _sampled_relu(x.contiguous(), sample, project, keep_mask=True)


@_sampled_relu_train.register_fake
def _(x, sample, project):
    n, _, P = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(n, sample.shape[0], P, dtype=torch.bool)


@torch.library.custom_op("eqzoo::sampled_relu_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor mask, Tensor sample, Tensor project) -> Tensor")
def _sampled_relu_backward(grad, mask, sample, project):
    """``sampleᵀ @ (mask * (projectᵀ @ grad))``, chunk by chunk as the forward. The mask is read
    as uint8, not bool: a float times a bool tensor first copies the bool tensor to float (a
    pass as slow as the product), a uint8 one is cast on the fly."""
    mask = mask.view(torch.uint8)
    grad = grad.contiguous()
    n, _, P = grad.shape
    step = _rows_per_chunk(n, sample.shape[0] * P, grad.device)
    if step >= n:
        return torch.matmul(sample.T, torch.matmul(project.T, grad).mul_(mask))
    dx = torch.empty_like(grad)
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        d_samples = torch.bmm(project.T.expand(rows.stop - i, -1, -1), grad[rows]).mul_(mask[rows])
        torch.bmm(sample.T.expand(rows.stop - i, -1, -1), d_samples, out=dx[rows])
    return dx


@_sampled_relu_backward.register_fake
def _(grad, mask, sample, project):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _sampled_relu_setup(ctx, inputs, output):
    _, sample, project = inputs
    ctx.save_for_backward(output[1], sample, project)


def _sampled_relu_grad(ctx, grad, _grad_mask):
    mask, sample, project = ctx.saved_tensors
    return _sampled_relu_backward(grad, mask, sample, project), None, None


_sampled_relu_train.register_autograd(_sampled_relu_grad, setup_context=_sampled_relu_setup)


class FourierReLU(ConstantBuffers, nn.Module):
    def __init__(self, field_type, n_rot: int = 16, device=None, dtype=None):
        super().__init__()
        rep = single_repr(field_type)
        G = group_of(field_type)
        if n_rot % 4:
            raise ValueError(f"n_rot must be a multiple of 4 (to contain the 90-degree rotations), got {n_rot}")
        elements = G.elements(None if G.is_finite else n_rot)
        rho = np.stack([rep(g) for g in elements])  # [N, d, d]
        A = np.einsum("nde,e->nd", rho, self._probe(rep))  # f_x(g) = <ρ(g) v, x>
        if np.linalg.matrix_rank(A) < rep.size:
            raise ValueError(f"{len(elements)} samples cannot represent fields of size {rep.size}: raise n_rot")
        self.num_features = field_type.size
        self.field_size = rep.size
        # kept in numpy (small) to rebuild the buffers, which no device context can then reach
        self._operator_values = (A, np.linalg.pinv(A))
        self._register_constant_buffers(device, dtype)

    def _constant_buffers(self, device=None, dtype=None) -> dict:
        """The sampling matrix [N, d] and its pseudo-inverse."""
        dd = dict(dtype=dtype or torch.float32, device=device)
        return {name: torch.tensor(v, **dd) for name, v in zip(("_sample", "_project"), self._operator_values)}

    @staticmethod
    def _probe(rep) -> np.ndarray:
        """The vector whose orbit samples the field: the delta at the identity of a band-limited
        regular representation, i.e. sqrt(d_ψ) e_j in the j-th copy of each irrep ψ."""
        parts, seen = [], {}
        for irr_id in rep.irreps:
            irr = rep.group.irrep(*irr_id)
            j = seen.get(irr_id, 0)
            seen[irr_id] = j + 1
            v = np.zeros(irr.size)
            v[j % irr.size] = np.sqrt(irr.size)
            parts.append(v)
        return rep.change_of_basis @ np.concatenate(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # [B * fields, d, pixels]: the small operators multiply from the left, batched over fields,
        # so neither product reorders the activations (einsum's permutes cost more than the products)
        xf = x.reshape(B * (C // self.field_size), self.field_size, H * W)
        sample, project = self._sample.to(x.dtype), self._project.to(x.dtype)
        if not torch.jit.is_scripting():  # (TorchScript takes no autograd functions: not in a script or trace)
            if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
                # under autocast in its dtype, as a matmul would be (the cast's backward casts back)
                if autocast_enabled(x.device):
                    dtype = torch.get_autocast_dtype(x.device.type)
                    xf, sample, project = xf.to(dtype), sample.to(dtype), project.to(dtype)
                with autocast_off(x.device):
                    return _sampled_relu_train(xf, sample, project)[0].view(B, C, H, W)
            if not torch.jit.is_tracing() and not autocast_enabled(x.device):
                return _sampled_relu(xf, sample, project)[0].view(B, C, H, W)
        return torch.matmul(project, torch.matmul(sample, xf).relu_()).view(B, C, H, W)

    def export(self) -> nn.Module:
        return self  # already plain torch

    def extra_repr(self) -> str:
        return f"{self.num_features} channels, fields of size {self.field_size}, {self._sample.shape[0]} samples"


def _irrep_blocks(field_type, what: str) -> tuple[list[tuple[int, int]], list[int]]:
    """The field's irrep blocks as (start, size) of its non-trivial irreps, and the positions of
    its trivial components; the field must be stored in its irrep basis (escnn's band-limited
    regular fields of O(2)/SO(2) are)."""
    rep = single_repr(field_type)
    if not np.allclose(rep.change_of_basis, np.eye(rep.size)):
        raise ValueError(f"the {what} nonlinearity needs fields stored irrep by irrep (O(2)/SO(2) fields); "
                         f"{rep.name} is not")
    blocks, trivial, pos = [], [], 0
    for irr_id in rep.irreps:
        irr = rep.group.irrep(*irr_id)
        if irr.is_trivial():
            trivial.append(pos)
        else:
            blocks.append((pos, irr.size))
        pos += irr.size
    if not trivial:
        raise ValueError(f"the {what} nonlinearity needs an invariant component in each field; {rep.name} has none")
    return blocks, trivial


class _IrrepwiseNonlinearity(ConstantBuffers, nn.Module):
    """Shared parts of :class:`NormReLU` and :class:`GatedReLU`: the field layout as constant
    masks and block matrices (rebuilt after ``to_empty()``), the shape checks and export."""

    kind = ""

    def __init__(self, field_type, device=None, dtype=None):
        super().__init__()
        self.kind = type(self).kind  # an instance attribute: TorchScript reads those
        self.blocks, self.trivial = _irrep_blocks(field_type, self.kind)
        self.num_features = field_type.size
        self.num_fields, self.field_size = len(field_type), single_repr(field_type).size
        self._register_constant_buffers(device, dtype)

    def _constant_buffers(self, device=None, dtype=None) -> dict:
        d = self.field_size
        mask = torch.zeros(d, 1, dtype=torch.bool, device=device)
        mask[self.trivial] = True
        members = torch.zeros(d, len(self.blocks), dtype=dtype or torch.float32, device=device)
        for j, (start, size) in enumerate(self.blocks):
            members[start:start + size, j] = 1
        return {"_trivial_mask": mask, "_members": members}  # [d, 1]; [d, blocks]: component in block

    def _fields(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"the {self.kind} nonlinearity expects [B, {self.num_features}, H, W] "
                             f"({self.num_fields} fields of size {self.field_size}), got {list(x.shape)}")
        B, C, H, W = x.shape
        return x.reshape(B, self.num_fields, self.field_size, H * W)

    def export(self) -> nn.Module:
        return self  # already plain torch

    def extra_repr(self) -> str:
        return f"{self.num_features} channels, fields of size {self.field_size}, {len(self.blocks)} irrep blocks"


class NormReLU(_IrrepwiseNonlinearity):
    r"""Norm-ReLU per irrep block: :math:`x_j \mapsto x_j\, \mathrm{relu}(|x_j| - b_j) / |x_j|` for
    each non-trivial block, ReLU on the trivial components.

    ``bias`` (the thresholds b, one per field and block) starts at the median norm of a standard
    normal vector of the block's size (0.67 for 1-d blocks, 1.18 for 2-d ones): after a batch norm,
    about half of the blocks pass, as half of a ReLU's inputs do."""

    kind = "norm"

    def __init__(self, field_type, device=None, dtype=None):
        super().__init__(field_type, device=device, dtype=dtype)
        if any(size > 2 for _, size in self.blocks):
            raise ValueError("NormReLU supports irrep blocks of size 1 and 2 (subgroups of O(2))")
        self.bias = nn.Parameter(torch.empty(self.num_fields, len(self.blocks), device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.bias.is_meta:
            return
        # medians of the norm of a standard normal vector: chi with 2 and 1 degrees of freedom
        medians = [math.sqrt(2 * math.log(2)) if size == 2 else 0.6744897501960817 for _, size in self.blocks]
        self.bias.copy_(torch.tensor(medians, dtype=self.bias.dtype).expand_as(self.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._fields(x)  # [B, F, d, P]
        members = self._members.to(x.dtype)
        norms = torch.matmul(members.T, xf * xf).add_(1e-12).sqrt_()  # [B, F, blocks, P]
        scale = torch.matmul(members, torch.relu(norms - self.bias.to(x.dtype)[:, :, None]) / norms)
        return torch.where(self._trivial_mask, xf.relu(), xf * scale).view(x.shape)


class GatedReLU(_IrrepwiseNonlinearity):
    r"""Each field gated by its own invariant component: :math:`x_j \mapsto x_j\,σ(x_0)` for the
    other components, :math:`x_0 \mapsto \mathrm{relu}(x_0)` (x_0: the field's first trivial
    component, invariant, so the gate is too). No parameters."""

    kind = "gated"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._fields(x)
        if not torch.jit.is_scripting():  # (TorchScript takes no autograd functions: not in a script or trace)
            if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
                return _Gated.apply(xf, self.trivial).view(x.shape)
            if not torch.jit.is_tracing():
                return _gated(xf, self.trivial)[0].view(x.shape)
        g = self.trivial[0]
        return torch.where(self._trivial_mask, xf.relu(), xf * torch.sigmoid(xf[:, :, g:g + 1])).view(x.shape)


def _gated(xf: torch.Tensor, trivial: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`GatedReLU` on x [B, F, d, P] in one pass over x, and the gates σ(x_0)."""
    g = trivial[0]
    gate = torch.sigmoid(xf[:, :, g:g + 1])
    y = xf * gate
    y[:, :, trivial] = xf[:, :, trivial].relu()
    return y, gate


class _Gated(torch.autograd.Function):
    """:class:`GatedReLU` on x [B, F, d, P], keeping x and the gates (1/d of x) for backward:
    dx_j = dy_j σ(x_0) for the gated components, and the gate's own component gets its ReLU's
    gradient plus Σ_j dy_j x_j σ'(x_0)."""

    @staticmethod
    def forward(ctx, xf, trivial):
        y, gate = _gated(xf, trivial)
        ctx.save_for_backward(xf, gate)
        ctx.trivial = trivial
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        xf, gate = ctx.saved_tensors
        trivial, g = ctx.trivial, ctx.trivial[0]
        dx = dy * gate
        dgate = (dy * xf).sum(dim=2, keepdim=True) - (dy[:, :, trivial] * xf[:, :, trivial]).sum(dim=2, keepdim=True)
        dx[:, :, trivial] = dy[:, :, trivial] * (xf[:, :, trivial] > 0)
        dx[:, :, g:g + 1] += dgate * gate * (1 - gate)
        return dx, None


def field_relu(field_type, nonlinearity: str = "auto", inplace: bool = False, device=None, dtype=None) -> nn.Module:
    """The nonlinearity for a field type: the channel-wise ReLU for permutation fields (regular
    fields of finite groups, whose only option is ``"auto"``); for the band-limited fields of
    O(2)/SO(2) one of ``"fourier"`` (``"auto"``), ``"norm"`` or ``"gated"`` (see the module docstring)."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    if is_permutation(single_repr(field_type)):
        if nonlinearity != "auto":
            raise ValueError(f"nonlinearity={nonlinearity!r} is for the band-limited fields of O(2)/SO(2); "
                             "regular fields of finite groups take the channel-wise ReLU: use 'auto'")
        return nn.ReLU(inplace=inplace)
    kind = {"auto": FourierReLU, "fourier": FourierReLU, "norm": NormReLU, "gated": GatedReLU}[nonlinearity]
    return kind(field_type, device=device, dtype=dtype)


def field_max_pool(field_type, kernel_size: int, stride: int, padding: int = 0) -> nn.Module:
    """Max-pooling for permutation fields; average pooling for the others (a channel-wise max
    of Fourier coefficients is not equivariant)."""
    if is_permutation(single_repr(field_type)):
        return nn.MaxPool2d(kernel_size, stride, padding)
    return nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=False)
