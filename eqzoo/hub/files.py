"""Reading a saved model's files from the Hub or a folder, without building the model."""
from __future__ import annotations

import os
from pathlib import Path

from .._io import check_safetensors
from ..errors import CheckpointError
from ..models._schema import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, load_config_file, validate_saved_config
from ..sources import fetch, parse_source

__all__ = ["read_config", "model_args_from_hub", "check_saved_folder"]


def read_config(source: str | os.PathLike, architecture: str | None = None) -> dict:
    """Download/read and validate config.json of a ``hf-hub:``/``local-dir:`` source or a folder."""
    kind, location = parse_source(source)
    cfg = load_config_file(fetch(kind, location, CONFIG_NAME))
    return validate_saved_config(cfg, architecture, source=f"{kind}:{location}/{CONFIG_NAME}")


def model_args_from_hub(pretrained_cfg) -> dict:
    """model_args stored in the Hub config.json of a registry cfg with ``hf_hub_id`` (a dict, a
    timm ``PretrainedCfg`` or the hub id itself), validated."""
    if isinstance(pretrained_cfg, str):
        hub_id = pretrained_cfg
    else:
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise ValueError("pretrained_cfg has no hf_hub_id")
    return dict(read_config(f"hf-hub:{hub_id}").get("model_args", {}))


def check_saved_folder(directory: str | os.PathLike) -> Path:
    """A folder as :func:`eqzoo.save_pretrained` writes it: a valid config.json, complete
    safetensors weights (never a pickle) and the model card."""
    directory = Path(directory)
    read_config(f"local-dir:{directory}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found; eqzoo loads weights only from model.safetensors, never from "
                              "pickle files such as pytorch_model.bin. Save it with eqzoo.save_pretrained.")
    check_safetensors(weights, f"local-dir:{directory}")
    if not (directory / CARD_NAME).is_file():
        raise FileNotFoundError(f"{directory / CARD_NAME} missing: write the folder with eqzoo.save_pretrained")
    return directory
