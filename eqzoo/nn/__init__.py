"""eqzoo layers: plain tensors in and out, escnn only at build time."""
from .activation import FourierReLU, field_max_pool, field_relu
from .conv import PEConv2d, PELinear
from .norm import FieldBatchNorm2d

__all__ = ["PEConv2d", "PELinear", "FieldBatchNorm2d", "FourierReLU", "field_relu", "field_max_pool"]
