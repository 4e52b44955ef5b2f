"""What a twirl hands over: the declared :class:`Layout` interface, the sizes it works with, and
the row helpers its implementations share."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# The two forms a convolution consumes: the pixel filter [(o a), (i b), k, k], channels grouped
# per field as escnn's (field, component), and the harmonic matrix [(a o), (b h i)] that the
# harmonic-domain convolution multiplies the harmonic responses of its input with.
KINDS = ("pixels", "harmonics")


@dataclass(frozen=True)
class Dims:
    """The sizes of a layer's coefficients ``W [d_out * d_in * H, F_out, F_in]``: components of one
    out / in field, basis functions, out / in fields."""

    d_out: int
    d_in: int
    harmonics: int
    fields_out: int
    fields_in: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """``(d_out, d_in, H, F_out, F_in)``: the coefficients viewed per component and field."""
        return self.d_out, self.d_in, self.harmonics, self.fields_out, self.fields_in

    @property
    def rows(self) -> int:
        return self.d_out * self.d_in * self.harmonics

    @property
    def pairs(self) -> int:
        return self.fields_out * self.fields_in


class Layout(ABC):
    """The twirled coefficients in one of the :data:`KINDS`, from the rows a twirl path computes
    (each path says what its rows are), and the way back for the gradient."""

    dims: Dims

    @abstractmethod
    def from_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The path's rows -> the tensor the convolution consumes."""

    @abstractmethod
    def to_rows(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of that tensor -> the gradient of the rows (the adjoint of :meth:`from_rows`)."""


# The twirl's gathers and row dot products run several times slower on rows that start off a
# 64-byte boundary, so rows of F_o * F_i coefficients are padded to a multiple of this many floats
# when they need it.
ROW_ALIGN = 16


def padded(n: int) -> int:
    return -(-n // ROW_ALIGN) * ROW_ALIGN


def rows_of(t: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """``t`` (any strides, F_o * F_i numbers per row in its last two dims) copied into a
    contiguous [rows, width] tensor, zero beyond its F_o * F_i columns: one copy, padded or not."""
    n = t.shape[-1] * t.shape[-2]
    out = t.new_empty(rows, width)
    out[:, n:].zero_()
    out[:, :n].view(t.shape).copy_(t)
    return out


def product_into(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` (any strides) as a new contiguous tensor: the product and the copy in one pass."""
    if torch.compiler.is_compiling():  # out= arguments don't trace
        return (t * scale).contiguous()
    return torch.mul(t, scale, out=t.new_empty(t.shape))
