r"""The loss terms that shape the learnt likelihoods (with the reference code's weights).

.. math::
    R = α \sum_l \log\frac{\max_g λ_l(g)}{λ_l(e)}
      + \frac{β}{M} \sum_{l ≥ 2} \mathrm{KL}(λ_l \,\|\, \mathrm{sg}[λ_{l-1}])
      + \frac{γ}{M} \mathrm{KL}(λ_1 \,\|\, U)

over the M distinct likelihoods of a model, in the order their layers appear.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .likelihood import likelihoods

__all__ = ["likelihoods", "regularization"]


def regularization(model: nn.Module, alignment: float = 5.0, kl_chain: float = 3.0,
                   kl_uniform: float = 3.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(weighted total, {"alignment", "kl_chain", "kl_uniform"} unweighted parts)``.

    Frozen likelihoods still count (they are constants). A model without likelihoods gives 0."""
    for name, w in (("alignment", alignment), ("kl_chain", kl_chain), ("kl_uniform", kl_uniform)):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 <= w < math.inf:
            raise ValueError(f"regulariser weight {name} must be a finite number >= 0, got {w!r}")
    lams = list(likelihoods(model).values())
    zero = next((p.new_zeros(()) for p in model.parameters()), torch.zeros(()))
    if not lams:
        return zero, {"alignment": zero, "kl_chain": zero, "kl_uniform": zero}
    M = len(lams)
    parts = {
        "alignment": sum((lam.alignment() for lam in lams), zero),
        "kl_chain": sum((cur.kl(prev, detach_other=True) for prev, cur in zip(lams, lams[1:])
                         if cur.group == prev.group), zero) / M,
        "kl_uniform": lams[0].kl_uniform() / M,
    }
    total = alignment * parts["alignment"] + kl_chain * parts["kl_chain"] + kl_uniform * parts["kl_uniform"]
    return total, parts
