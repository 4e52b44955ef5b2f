"""The eqzoo model zoo: importing this registers the ``pe_*`` models with timm.

FX: eqzoo's layers check their inputs and cache filters with Python control flow, so symbolic
tracing must not enter them; they are registered as timm's leaf ("notrace") modules, which timm's
feature extraction (``features_only=True, feature_cls='fx'``, ``timm.layers._fx``) uses. With
torchvision's ``create_feature_extractor`` directly, pass ``tracer_kwargs=eqzoo.models.fx_tracer_kwargs()``.
"""
from timm.layers import get_notrace_functions, get_notrace_modules, register_notrace_function, register_notrace_module

from ..nn import FieldBatchNorm2d, FourierReLU, GatedReLU, NormReLU, PEConv2d, PELinear
from ._common import set_data_config
from ._layers import check_pooled
from .pe_resnet import PEBasicBlock, PEBottleneck, PEResNet
from .pe_wrn import PEWideResNet, WideResNet

for _leaf in (PEConv2d, PELinear, FieldBatchNorm2d, FourierReLU, NormReLU, GatedReLU):
    register_notrace_module(_leaf)
register_notrace_function(check_pooled)


def fx_tracer_kwargs() -> dict:
    """``tracer_kwargs`` for torchvision's FX feature extraction that keep eqzoo's layers (and
    timm's own non-traceable ones) as leaves."""
    return {"leaf_modules": get_notrace_modules(), "autowrap_functions": get_notrace_functions()}


__all__ = ["PEResNet", "PEBasicBlock", "PEBottleneck", "PEWideResNet", "WideResNet", "fx_tracer_kwargs",
           "set_data_config"]
