"""The parts of timm eqzoo uses that timm does not export publicly, named in this one module.

Each has no public equivalent in the timm versions ``pyproject.toml`` allows; eqzoo never assigns
into timm (no patching): it only calls these.
"""
from timm.models._features import feature_take_indices  # forward_intermediates' index rule, as timm's models
from timm.models._hub import save_config_for_hf  # timm's config.json writer (save_for_hf writes weights too)

__all__ = ["feature_take_indices", "save_config_for_hf"]
