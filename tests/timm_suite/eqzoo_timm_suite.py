"""The ``TORCH_BACKEND`` module under which timm's own ``tests/test_models.py`` runs on eqzoo's
models (timm's test file imports ``$TORCH_BACKEND`` before it lists the models).

It imports eqzoo, which registers the ``pe_*`` models, and registers one more name for the test
run only: ``pe_resnet18_o2``, pe_resnet18 over O(2). timm's test file builds every model with its
default arguments, so a model over another group needs a name of its own to be tested.
"""
import timm
from timm.models import generate_default_cfgs, model_entrypoint, register_model

import eqzoo  # noqa: F401  (registers the pe_* models)

default_cfgs = generate_default_cfgs({"pe_resnet18_o2": timm.get_pretrained_cfg("pe_resnet18").to_dict()})


@register_model
def pe_resnet18_o2(pretrained: bool = False, **kwargs):
    """pe_resnet18 with ``group="O2"``."""
    return model_entrypoint("pe_resnet18")(pretrained, **dict(kwargs, group="O2"))
