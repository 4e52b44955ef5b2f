"""The engine's functions: ``train``, ``finetune`` and ``evaluate`` (what ``eqzoo train | finetune |
eval`` run)."""
from __future__ import annotations

import os
import sys

import timm

from ..config import load_config, parse_overrides, read_yaml, validate_config
from ..data import build_datasets, data_info
from ..errors import ConfigError, TrainingError
from ..sources import resolve_model
from .dist import init_dist, run_device
from .loop import eval_loader, evaluate_loader
from .model import lambda_kl, mixed_precision
from .run import run_training


def train(cfg, resume: bool = False, stop_after_epoch: int | None = None, overrides=None,
          overwrite: bool = False) -> dict:
    """Train from a config (path, dict or resolved config) into ``cfg.output``; returns a summary:
    ``status`` ("finished" / "stopped"), ``run_dir``, ``history`` (one dict per epoch), ``results``
    (best epoch, val/test accuracy), ``model_dir`` (the Hub-format folder, RUN/hub).

    ``resume`` continues the run in ``cfg.output`` from its last checkpoint; ``stop_after_epoch``
    stops (resumably) once that many epochs are done. A folder that holds another run is refused
    unless resuming, or with ``overwrite`` (which deletes that run's files)."""
    return run_training(load_config(cfg, overrides), resume, stop_after_epoch, overwrite)


def config_model(cfg) -> str | None:
    """The ``model`` a config (path or dict) names, if any."""
    raw = read_yaml(cfg) if isinstance(cfg, (str, os.PathLike)) else (cfg or {})
    return raw.get("model")


def finetune_config(cfg, source: str | None, overrides=None) -> dict:
    """The config a fine-tuning run uses and records (``cfg``: path, dict or resolved config). With a
    ``source``, the model and its architecture come from it: the config need not name a model, and
    when it does (e.g. the CNN baseline a data config was written for) its ``model`` and
    ``model_args`` are replaced; only model_args given as overrides (``model_args.drop_path_rate=0.1``)
    apply."""
    overrides = parse_overrides(overrides) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    explicit = dict(overrides.get("model_args") or {})
    if source is not None:
        resolve_model(source)  # a mistyped path fails first
        if not config_model(cfg):
            overrides.setdefault("model", source)
    cfg = dict(load_config(cfg, overrides))
    if source is not None:
        unused = [k for k in cfg["model_args"] if k not in explicit]
        if (cfg["model"] != source or unused) and int(os.environ.get("RANK", "0")) == 0:
            print(f"fine-tuning {source}: the config's model ({cfg['model']})"
                  + (f" and model_args ({', '.join(unused)})" if unused else "")
                  + " describe another model and are not used", file=sys.stderr)
        cfg.update(model=source, model_args=explicit)
    cfg["model"], cfg["pretrained"] = resolve_model(cfg["model"]), True
    return validate_config(cfg)


def finetune(cfg, source: str | None = None, resume: bool = False, stop_after_epoch: int | None = None,
             overrides=None, overwrite: bool = False) -> dict:
    """Fine-tune a pretrained model (``source`` or ``cfg.model``: ``hf-hub:org/name``,
    ``local-dir:PATH``, a run directory (its hub/) or model directory, or a registry ``arch.tag``)
    on ``cfg.data`` with a new classifier for its classes. λ keeps learning unless
    ``freeze_likelihood``. With ``source``, the config's model and model_args are not used (see
    :func:`finetune_config`)."""
    return run_training(finetune_config(cfg, source, overrides), resume, stop_after_epoch, overwrite)


def evaluate(cfg, source: str | None = None, split: str = "test") -> dict:
    """Accuracy and loss of a trained model on a split (``train``/``val``/``test``) of ``cfg.data``.

    ``source``: a run directory (its ``hub/``), a model directory, ``local-dir:``/``hf-hub:`` or a
    registry tag; default ``cfg.model``. Returns ``{"split", "loss", "acc", "top5", "n", "lambda_kl",
    "model"}`` and the model's ``label_names`` where it has them (refused when the data set's differ)."""
    cfg = load_config(cfg)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    src = resolve_model(source or cfg["model"])
    info = data_info(cfg["data"], cfg["model_args"].get("in_chans"))
    d = init_dist(cfg["device"])
    try:
        device = run_device(cfg, d)
        model = timm.create_model(src, pretrained=True)
        if model.num_classes != info["num_classes"]:
            raise TrainingError(f"{src} has {model.num_classes} classes, data set {cfg['data']['name']} has "
                                f"{info['num_classes']}: evaluate it on the data it was trained for")
        model.to(device)
        # read the images with the model's channels (a fine-tune's config need not name them)
        splits = build_datasets(cfg["data"], model, getattr(model, "in_chans", None) or info["in_chans"])
        names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
        if names and splits.label_names and list(names) != list(splits.label_names):
            raise TrainingError(f"{src} was trained on the classes {list(names)[:10]}, data set "
                                f"{cfg['data']['name']} has {list(splits.label_names)[:10]}: the same number, other names")
        ds = getattr(splits, split)
        if ds is None:
            raise ConfigError(f"the {split} split of {cfg['data']['name']} is empty (data.{split}_size)")
        autocast, _ = mixed_precision(cfg, device)
        out = evaluate_loader(model, eval_loader(ds, cfg, d), device, autocast, d)
        named = {"label_names": list(names)} if names else {}
        return {"split": split, **out, "lambda_kl": lambda_kl(model), "model": src, **named}
    finally:
        d.close()
