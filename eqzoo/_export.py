"""Export a pe model to plain torch: no eqzoo layers, no escnn, zero inference overhead.

Every layer with an ``export()`` (PEConv2d -> nn.Conv2d with the current filter, PELinear ->
nn.Linear, FieldBatchNorm2d -> nn.BatchNorm2d equal in eval mode) is replaced in a copy of the
model; the likelihoods disappear with their layers (they are baked into the filters). When the
model has a plain counterpart with the same state_dict (timm's own ResNets for finite groups, the
plain WideResNet), the weights are loaded into that instead, so the result is e.g. exactly
``timm.create_model('resnet18')``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .nn import FieldBatchNorm2d, FourierReLU, PEConv2d, PELinear

_EXPORTABLE = (PEConv2d, PELinear, FieldBatchNorm2d, FourierReLU)


def _swap_layers(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with each eqzoo layer replaced by its ``export()``. The exports are
    seeded into deepcopy's memo, so the (large, build-time) eqzoo layers are never copied."""
    memo = {}
    for m in model.modules():
        if isinstance(m, _EXPORTABLE) and id(m) not in memo:
            plain = m.export()
            if plain is not m:  # FourierReLU exports itself: let deepcopy copy it
                memo[id(m)] = plain
    return copy.deepcopy(model, memo)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


@torch.no_grad()
def export(model: nn.Module, counterpart: bool | None = None) -> nn.Module:
    """A plain-torch model computing what ``model`` computes (in eval mode exactly; batch norms
    broadcast the per-field statistics to channels).

    Args:
        model: an eqzoo model or any module containing eqzoo layers. It is not modified.
        counterpart: ``None`` (default): return the plain counterpart (``model.plain_counterpart()``,
            e.g. timm's ``resnet18``) loaded with ``strict=True`` when the model has one with the
            same state_dict, else the copy with swapped layers. ``True``: require the counterpart
            (``ValueError`` if there is none). ``False``: always the copy with swapped layers.
    """
    plain = _swap_layers(model)
    if counterpart is False:
        return plain
    make = getattr(model, "plain_counterpart", None)
    target = make() if callable(make) else None
    state = plain.state_dict()
    if target is not None and _same_state(target.state_dict(), state):
        ref = next(plain.parameters(), None)
        if ref is not None:
            target = target.to(device=ref.device, dtype=ref.dtype)
        target.load_state_dict(state, strict=True)
        data = getattr(model, "pretrained_cfg", None)
        if data:  # the input it was trained on (size, channels, mean, std, class names), not the registry's
            from .models import set_data_config
            set_data_config(target, data)
        return target.train(model.training)
    if counterpart:
        why = ("it has none (continuous groups or custom widths have no plain counterpart)" if target is None
               else "its state_dict differs (e.g. a pruned model)")
        raise ValueError(f"{type(model).__name__} cannot be exported to a plain counterpart: {why}; "
                         "use counterpart=None or False for a copy with plain layers")
    return plain
