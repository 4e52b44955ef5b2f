"""eqzoo layers: plain tensors in and out, escnn only at build time."""
from .activation import NONLINEARITIES, FourierReLU, GatedReLU, NormReLU, field_max_pool, field_relu
from .conv import PEConv2d, PELinear
from .norm import FieldBatchNorm2d
from .sync_batchnorm import SyncFieldBatchNorm2d, convert_sync_batchnorm

__all__ = ["PEConv2d", "PELinear", "FieldBatchNorm2d", "FourierReLU", "NormReLU", "GatedReLU", "NONLINEARITIES",
           "field_relu", "field_max_pool", "SyncFieldBatchNorm2d", "convert_sync_batchnorm"]
