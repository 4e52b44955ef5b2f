"""Facts about the representation of a homogeneous field type, computed once per type."""
from __future__ import annotations

import numpy as np

from ..kernels import permutation_indices


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
