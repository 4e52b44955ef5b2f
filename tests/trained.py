"""Layers and models in a state like the one training leaves them in.

A fresh layer's kernel is equivariant, so its function does not depend on λ at all; tests that
need λ to show (export, save and load, cache invalidation, λ read-outs) start from these."""
import torch

import eqzoo
from eqzoo.nn import PEConv2d, PELinear


@torch.no_grad()
def generic_kernels(module):
    """Give every PEConv2d / PELinear in ``module`` (itself included) kernels with a
    non-equivariant part, at the scale of the init: κ_0 and, where λ is learnable, the
    symmetry-breaking κ_1. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (PEConv2d, PELinear)):
            std = float(m.weight.std())
            m.weight.normal_(0, std)
            if m.weight_breaking is not None:
                m.weight_breaking.normal_(0, std)
    return module


@torch.no_grad()
def trained_looking(model, std: float = 0.3):
    """Every λ off uniform (coefficients ~ N(0, std)) and every kernel generic. Returns ``model``."""
    for lam in eqzoo.likelihoods(model).values():
        lam.coefficients.normal_(0, std)
    return generic_kernels(model)
