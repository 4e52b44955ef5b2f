"""Facts about the representation of a homogeneous field type, computed once per type."""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import permutation_indices
from ..likelihood import autocast_enabled


def single_repr(field_type, what: str = "field type"):
    """The one representation a field type is made of (eqzoo layers need homogeneous types)."""
    from escnn.nn import FieldType

    if not isinstance(field_type, FieldType):
        raise TypeError(f"{what} must be an escnn FieldType (e.g. eqzoo.groups.get_group('D4')"
                        f".field_type(8)), got {type(field_type).__name__}")
    reps = {r.name for r in field_type.representations}
    if len(reps) != 1:
        raise ValueError(f"{what} must hold copies of one representation (eqzoo layers need "
                         f"homogeneous field types); got {sorted(reps)}")
    return field_type.representations[0]


def is_permutation(rep) -> bool:
    """True when every ρ(g) permutes the channels (regular fields of finite groups, trivial
    fields): then channel-wise ReLU, max-pooling and per-field statistics are equivariant."""
    if rep.group.order() <= 0:
        return False
    return permutation_indices(np.stack([rep(g) for g in rep.group.elements])) is not None


def check_input(module, x: torch.Tensor, field_type, dtype: torch.dtype, spatial: bool) -> None:
    """Refuse an input ``x`` that is not ``[B, C, H, W]`` (``[B, C]`` where not ``spatial``) with
    the channels of ``field_type``, or whose dtype is not the weights' ``dtype`` outside autocast
    (as nn.Conv2d: casting the filter to the input would silently run a float32 model in float16)."""
    name = type(module).__name__
    if x.dim() != (4 if spatial else 2) or x.shape[1] != field_type.size:
        shape = "[B, C, H, W]" if spatial else "[B, C]"
        raise ValueError(f"{name} expects {shape} with C = {field_type.size} ({len(field_type)} fields of "
                         f"size {single_repr(field_type).size}), got shape {tuple(x.shape)}")
    if (x.dtype != dtype and not autocast_enabled(x.device)) or not x.is_floating_point():
        hint = " (images as uint8: convert with x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise RuntimeError(f"{name}: input dtype {x.dtype} does not match the weights' {dtype}{hint}; cast the "
                           f"input (x.to({dtype})) or the model (model.to(dtype)), or run under torch.autocast")
