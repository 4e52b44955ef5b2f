"""Nonlinearities and pooling on plain tensors of fields.

Permutation fields (regular fields of finite groups) commute with anything applied channel by
channel, so ReLU and max-pooling are used as they are. The band-limited fields of O(2)/SO(2) are
Fourier coefficients of a function on the group: :class:`FourierReLU` samples that function on a
grid of the group, applies the ReLU there and projects back (escnn's FourierPointwise idea). It is
exactly equivariant to the grid's elements, which include the 90-degree rotations and the
reflections, and approximately to the rest of the group.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..groups import group_of
from .fields import is_permutation, single_repr


class FourierReLU(nn.Module):
    def __init__(self, field_type, n_rot: int = 16, inplace: bool = False, device=None, dtype=None):
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
        sample, project = self._operators(device, dtype)
        self.register_buffer("_sample", sample, persistent=False)
        self.register_buffer("_project", project, persistent=False)

    def _operators(self, device=None, dtype=None):
        """The sampling matrix [N, d] and its pseudo-inverse as tensors."""
        dd = dict(dtype=dtype or torch.float32, device=device)
        return tuple(torch.tensor(v, **dd) for v in self._operator_values)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the sampling operators (constants: after ``to_empty()`` their memory is garbage)."""
        self._sample, self._project = self._operators(self._sample.device, self._sample.dtype)

    def _load_from_state_dict(self, *args, **kwargs):
        # to_empty() + load_state_dict() must give a working layer: the constants are rebuilt first
        self.init_non_persistent_buffers()
        super()._load_from_state_dict(*args, **kwargs)

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
        xf = x.reshape(B, C // self.field_size, self.field_size, H, W)
        samples = torch.einsum("nd,bfdhw->bfnhw", self._sample.to(x.dtype), xf).relu()
        out = torch.einsum("dn,bfnhw->bfdhw", self._project.to(x.dtype), samples)
        return out.reshape(B, C, H, W)

    def export(self) -> nn.Module:
        return self  # already plain torch

    def extra_repr(self) -> str:
        return f"{self.num_features} channels, fields of size {self.field_size}, {self._sample.shape[0]} samples"


def field_relu(field_type, inplace: bool = False, device=None, dtype=None) -> nn.Module:
    """The ReLU for a field type: channel-wise for permutation fields, Fourier-sampled otherwise."""
    if is_permutation(single_repr(field_type)):
        return nn.ReLU(inplace=inplace)
    return FourierReLU(field_type, device=device, dtype=dtype)


def field_max_pool(field_type, kernel_size: int, stride: int, padding: int = 0) -> nn.Module:
    """Max-pooling for permutation fields; average pooling for the others (a channel-wise max
    of Fourier coefficients is not equivariant)."""
    if is_permutation(single_repr(field_type)):
        return nn.MaxPool2d(kernel_size, stride, padding)
    return nn.AvgPool2d(kernel_size, stride, padding, count_include_pad=False)
