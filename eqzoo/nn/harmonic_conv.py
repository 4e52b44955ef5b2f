r"""A :class:`~eqzoo.nn.PEConv2d` computed against its basis functions instead of the pixels:

.. math:: y_{o a}(p) = \sum_{b, h, i} W'_{a b h}[o, i]\, \langle ψ_h, x_{i b}|_{p} \rangle,

one matmul of the harmonic responses of the input patches with the twirled coefficients (the
twirl's ``"harmonics"`` layout). Taken in training where it pays (see :func:`pays`: deep stages,
small images), where building the pixel filter and its gradient costs more memory traffic than
the convolution itself."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..likelihood import autocast_enabled


def output_size(conv, x: torch.Tensor) -> tuple[int, int]:
    reach = conv.dilation * (conv.kernel_size - 1)
    h, w = ((n + 2 * conv.padding - reach - 1) // conv.stride + 1 for n in x.shape[2:])
    return h, w


def pays(conv, x: torch.Tensor) -> bool:
    """Whether :func:`conv_in_harmonics` is the cheaper way to train on this input: the batch has
    fewer output pixels than the layer has output channels (so building the pixel filter and its
    gradient would cost more than the convolution), and the input map is small enough for its
    patch projection (P input pixels per channel) to stay cheap next to the matmul."""
    h, w = output_size(conv, x)
    return 0 < x.shape[0] * h * w < conv.out_channels and 4 * x.shape[2] * x.shape[3] <= conv.out_channels


def patch_projection(conv, x: torch.Tensor) -> torch.Tensor:
    """The matrix [P, H * L] taking one channel's P input pixels to ⟨ψ_h, patch_l⟩ for the L
    output positions: unfolding and projecting on the basis in one small operator (built by
    unfolding the P one-hot images), so both directions are a single matmul. Kept per input size,
    dtype and device in ``conv._patch_projections``."""
    key = (x.shape[2], x.shape[3], x.dtype, x.device)
    if conv._patch_projections.get(key) is None:
        P = x.shape[2] * x.shape[3]
        one_hot = torch.eye(P, dtype=torch.float64, device="cpu").view(P, 1, *x.shape[2:])
        patches = F.unfold(one_hot, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        basis = torch.from_numpy(conv._ops.basis).reshape(conv._ops.basis.shape[0], -1)
        proj = torch.einsum("hx,pxl->phl", basis, patches).reshape(P, -1).to(x.device, x.dtype)
        if torch.compiler.is_compiling():
            return proj
        conv._patch_projections[key] = proj
    return conv._patch_projections[key]


def conv_in_harmonics(conv, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` through the harmonic responses of the input (see the module docstring)."""
    coeff, bias = conv._coefficients_and_bias("harmonics")  # [(a o), (b h i)]
    if not autocast_enabled(x.device):
        coeff = coeff.to(x.dtype)
    d = conv._dims
    d_o, d_i, H, F_o, F_i = d.d_out, d.d_in, d.harmonics, d.fields_out, d.fields_in
    B = x.shape[0]
    proj = patch_projection(conv, x)
    L = proj.shape[1] // H
    resp = x.reshape(B * conv.in_channels, -1) @ proj  # [(n i b), (h l)]
    # ordered (b, h, i) like the coefficients' columns; the in-field index stays innermost in
    # both, so the coefficients' reordering copies runs of F_i numbers, not a stride-F_i loop
    resp = resp.view(B, F_i, d_i, H, L).permute(0, 4, 2, 3, 1).reshape(B * L, d_i * H * F_i)
    y = resp @ coeff.T
    y = y.view(B, L, d_o, F_o).permute(0, 3, 2, 1).reshape(B, F_o * d_o, L)  # channels (o, a)
    if bias is not None:
        y = y + bias.to(y.dtype)[:, None]
    return y.view(B, F_o * d_o, *output_size(conv, x))
