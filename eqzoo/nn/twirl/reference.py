"""The λ-twirl written out from its definition, one dense term per group element: slow, and the
definition that every fast path (:mod:`.sparse`, :mod:`.frame`) is tested against."""
from __future__ import annotations

import torch


def twirl(q: torch.Tensor, W: torch.Tensor, ops) -> torch.Tensor:
    r"""``A(q) W = Σ_g q_g ρ_out(g) ⊗ ρ_in(g) ⊗ T(g)ᵀ W`` for canonical coefficients
    ``W [d_out, d_in, H, F_out, F_in]`` and quadrature weights ``q [m]`` over the operators'
    grid ``ops`` (a :class:`~eqzoo.nn.twirl.operators.TwirlOperators`):

    .. math:: W'_{a b k} = \sum_g q_g \sum_{c, e, h} ρ_{out}(g)_{a c}\, ρ_{in}(g)_{b e}\, T(g)_{h k}\, W_{c e h},

    i.e. the coefficients of ``Σ_g q_g ρ_out(g) κ(g⁻¹ x) ρ_in(g)ᵀ``."""
    T, r_in, r_out = (torch.as_tensor(a).to(W) for a in (ops.harmonic_action, ops.rho_in, ops.rho_out))
    terms = [q[g] * torch.einsum("ac,be,hk,cehoi->abkoi", r_out[g], r_in[g], T[g], W) for g in range(q.shape[0])]
    return torch.stack(terms).sum(0)


def coefficients(q: torch.Tensor, W0: torch.Tensor, ops, W1: torch.Tensor | None = None) -> torch.Tensor:
    """The coefficients of ``κ_λ = A(q) κ_0 + (A(q) - P) κ_1`` with P the twirl at uniform weights,
    for canonical coefficients as in :func:`twirl` (``W1`` optional)."""
    out = twirl(q, W0, ops)
    if W1 is not None:
        uniform = torch.full_like(q, 1.0 / q.numel())
        out = out + twirl(q, W1, ops) - twirl(uniform, W1, ops)
    return out


def pixel_filter(q: torch.Tensor, W0: torch.Tensor, ops, W1: torch.Tensor | None = None) -> torch.Tensor:
    """The pixel filter ``[(o a), (i b), k, k]`` of :func:`coefficients`: ``Σ_h W'_h ψ_h``."""
    basis = torch.as_tensor(ops.basis).to(W0)
    d_out, d_in, _, f_out, f_in = W0.shape
    k = basis.shape[-1]
    filt = torch.einsum("abhoi,hxy->oaibxy", coefficients(q, W0, ops, W1), basis)
    return filt.reshape(f_out * d_out, f_in * d_in, k, k)
