"""What a finished run leaves for others: its model in timm's Hub layout."""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from .._io import atomic_write, new_sibling_dir, replace_dir, save_tensors
from .._timm import save_config_for_hf
from ..data import DATASETS
from ..hub import is_pe_architecture, save_pretrained
from ..hub.card import run_card_data
from ..models import set_data_config


def save_model_dir(model: nn.Module, directory, cfg: dict | None = None, results: dict | None = None) -> Path:
    """The model in timm's Hub layout: :func:`eqzoo.save_pretrained` for eqzoo models (config,
    safetensors, likelihoods, card); for plain timm models (the CNN baselines) config.json +
    model.safetensors, loadable with ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    directory = Path(directory)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    model_args = dict((cfg or {}).get("model_args", {}))
    model_args.update(num_classes=model.num_classes, in_chans=_in_chans(model, cfg))
    if is_pe_architecture(arch):
        card = run_card_data(cfg, results) if cfg is not None else {}
        if cfg is not None and str(cfg["model"]).split(":")[0] in ("local-dir", "hf-hub"):
            model_args = None  # fine-tuned: the architecture's args come from the model itself
        else:
            model_args.pop("num_classes")
        names = model.pretrained_cfg.get("label_names")
        return save_pretrained(model, directory, dict(label_names=list(names)) if names else None,
                               model_args=model_args, card_data=card)
    new = new_sibling_dir(directory)  # written whole, then renamed into place (as save_pretrained)
    try:
        save_tensors(model.state_dict(), new / "model.safetensors")
        atomic_write(new / "config.json", lambda p: save_config_for_hf(model, p, model_args=model_args))
        replace_dir(new, directory)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return directory


def record_input(model: nn.Module, splits, cfg: dict) -> None:
    """Make the saved pretrained_cfg describe the input the model was trained on: its size, the
    class names where the data set has them, and, for the digit data sets (plain [0, 1] tensors,
    no normalisation), mean 0 / std 1, so that timm's resolve_data_config on the loaded model
    reproduces the training input."""
    if getattr(model, "pretrained_cfg", None) is None:
        return
    x, _ = splits.train[0]
    values = dict(input_size=tuple(x.shape), label_names=splits.label_names)
    if DATASETS[cfg["data"]["name"]][0] != "natural":
        c = x.shape[0]
        values.update(mean=(0.0,) * c, std=(1.0,) * c, crop_pct=1.0, interpolation="bilinear")
    set_data_config(model, **values)  # a grayscale model's 3-channel mean becomes its average there


def _in_chans(model, cfg) -> int:
    if cfg is not None and "in_chans" in cfg.get("model_args", {}):
        return cfg["model_args"]["in_chans"]
    return int(getattr(model, "in_chans", None) or (getattr(model, "pretrained_cfg", {}) or {}).get(
        "input_size", (3,))[0])
