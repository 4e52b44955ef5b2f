"""Run configurations: a YAML file with known keys and types, checked before anything is built.

A config is a nested dict. ``SCHEMA`` lists every accepted key with its types and default; a
config file only needs the keys it changes. :func:`load_config` reads a file, applies
``key=value`` overrides (dotted keys, YAML values: ``optim.lr=1e-3``, ``data.symmetry=[C1,SO2]``)
and returns the resolved config with every default filled in. Unknown keys, wrong types and
values outside an accepted set raise :class:`ConfigError` naming the key and what is accepted —
before any data set or model is built, so a typo never costs a training run.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._yaml import MAX_CONFIG_BYTES, parse_yaml
from .errors import ConfigError, ModelArgError
from .validate import NONE as _NONE
from .validate import Spec, check_arg, type_ok

__all__ = ["ConfigError", "SCHEMA", "default_config", "load_config", "parse_overrides", "validate_config",
           "dump_config"]

_NUM = (int, float)


@dataclass(frozen=True)
class Key(Spec):
    """One config key: what it accepts, as :class:`eqzoo.validate.Spec` checks it (the types as YAML
    parses them, choices, an inclusive range; numbers finite), with its default and doc."""

    default: Any = None
    doc: str = ""


def _key(types, default, choices=None, doc: str = "", min=None, max=None, check=None) -> Key:
    return Key(types=types if isinstance(types, tuple) else (types,), choices=choices, min=min, max=max,
               check=check, default=default, doc=doc)


def _betas_problem(v) -> str | None:
    ok = isinstance(v, list) and len(v) == 2 and all(type_ok(b, (float,)) and 0 <= b < 1 for b in v)
    return None if ok else f"must be two numbers in [0, 1), got {v!r}"


def _symmetry_problem(v) -> str | None:
    ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(g, str) for g in v))
    return None if ok else f"must be a group or a list of groups (e.g. C4 or [C1, SO2]), got {v!r}"


# timm schedulers whose learning rate is a function of the update count alone: a resumed run
# continues exactly ("plateau" needs the metric history, so is not offered)
SCHEDULES = ("cosine", "tanh", "poly", "step", "multistep", "constant")

# Caps on sizes that are materialised in memory (the synthetic data sets are built whole).
MAX_IMAGE_SIZE = 1024
MAX_SPLIT_SIZE = 10_000_000
MAX_BATCH = 65_536

# The schema. Sections are dicts of Key; ``model_args`` is free-form (it goes to timm.create_model,
# whose model checks it) and so is nothing else.
SCHEMA: dict[str, Any] = {
    "model": _key(str, None, doc="timm model name (`pe_resnet18`, `resnet18`, ...) or for fine-tuning a "
                                "pretrained source (`hf-hub:org/name`, `local-dir:PATH`, `arch.tag`)"),
    "model_args": _key(dict, {}, doc="extra timm.create_model kwargs: group, bandlimit, learn_likelihood, "
                                    "channels, layers, drop_rate, ..."),
    "pretrained": _key(bool, False, doc="load pretrained weights (fine-tuning)"),
    "reset_head": _key(bool, True, doc="fine-tuning: always start from a new classifier, even when the "
                                      "class count is unchanged"),
    "data": {
        "name": _key(str, None, doc="data set, see eqzoo.data.DATASETS"),
        "root": _key(str, "data", doc="folder holding the downloaded data sets"),
        "image_size": _key((int, _NONE), None, min=4, max=MAX_IMAGE_SIZE,
                          doc="side of the (square) input images; default per data set"),
        "symmetry": _key((str, list, _NONE), None, check=_symmetry_problem,
                        doc="group whose elements transform each image (digits / MNIST family: C1, C4, D4, "
                            "SO2, O2, D1, CN, DN); DDMNIST: [left group, right group]"),
        "classes": _key((list, _NONE), None, doc="digits / MNIST family: keep only these digit classes "
                                                "(relabelled 0..k-1)"),
        "train_size": _key((int, _NONE), None, min=1, max=MAX_SPLIT_SIZE,
                           doc="number of training images (default per data set)"),
        "val_size": _key((int, _NONE), None, min=0, max=MAX_SPLIT_SIZE,
                         doc="number of validation images (0: no validation)"),
        "test_size": _key((int, _NONE), None, min=0, max=MAX_SPLIT_SIZE, doc="number of test images (null: all)"),
        "seed": _key(int, 0, doc="seed of the data set generation (the transforms and the subsets), kept "
                                "apart from the training seed so that runs with different seeds see the same data"),
        "augment": _key(bool, True, doc="natural images: timm's training augmentation (random resized crop, colour "
                                       "jitter), without flips"),
        "hflip": _key(_NUM, 0.0, min=0, max=1, doc="natural images: probability of a horizontal flip in training (a "
                                                  "flip adds a symmetry to the data, which λ measures)"),
        "vflip": _key(_NUM, 0.0, min=0, max=1, doc="natural images: probability of a vertical flip in training"),
        "resample": _key(bool, False, doc="ddmnist: draw the training digits' transforms afresh each time an "
                                         "image is read, i.e. every epoch (the paper's protocol); val/test stay fixed"),
        "batch_size": _key(int, 64, min=1, max=MAX_BATCH,
                          doc="the global batch: split over the DDP processes (timm's train.py -b is per process)"),
        "eval_batch_size": _key((int, _NONE), None, min=1, max=MAX_BATCH,
                                doc="batch size for evaluation (default: 2x batch_size)"),
        "workers": _key(int, 0, min=0, max=256, doc="DataLoader worker processes"),
    },
    "optim": {
        "name": _key(str, "adamw", doc="any optimizer of timm.optim.list_optimizers() (adamw, sgd, lamb, lion, ...), "
                                      "built by timm.optim.create_optimizer_v2"),
        "lr": _key(_NUM, 1e-3, min=0, max=10),
        "weight_decay": _key(_NUM, 0.01, min=0, max=1, doc="applied to conv/linear weights only: not to biases, "
                                                          "norms or likelihoods"),
        "momentum": _key(_NUM, 0.9, min=0, max=0.9999, doc="momentum of the optimizers that have one (sgd, ...)"),
        "betas": _key(list, [0.9, 0.999], check=_betas_problem,
                      doc="betas of the optimizers that have them (adam, adamw, lamb, ...)"),
        "grad_clip": _key((_NUM + (_NONE,)), None, min=0, max=1e6, doc="clip the global gradient norm to this"),
        "label_smoothing": _key(_NUM, 0.0, min=0, max=0.9999),
        "likelihood_lr_scale": _key(_NUM, 1.0, min=0, max=1e4, doc="the likelihoods' learning rate is lr times this: "
                                                                 "λ has few coefficients with small, noisy gradients"),
    },
    "schedule": {
        "name": _key(str, "cosine", choices=SCHEDULES, doc="timm scheduler, stepped after every optimizer update"),
        "epochs": _key(int, 10, min=1, max=100_000),
        "warmup_epochs": _key(_NUM, 0, min=0, doc="linear warm-up from 0 over this many epochs"),
        "min_lr": _key(_NUM, 0.0, min=0, doc="learning rate at the end of the decay (cosine, tanh, poly)"),
        "decay_epochs": _key(_NUM, 30, min=0, max=100_000, doc="step: epochs between decays"),
        "decay_milestones": _key(list, [30, 60, 90], doc="multistep: the epochs at which to decay"),
        "decay_rate": _key(_NUM, 0.1, min=0, max=1e3, doc="step, multistep: lr factor per decay; poly: the power"),
    },
    "regularizer": {
        "alignment": _key(_NUM, 5.0, min=0, max=1e4, doc="α: the identity stays the mode of λ"),
        "kl_chain": _key(_NUM, 3.0, min=0, max=1e4, doc="β: neighbouring layers' λ agree"),
        "kl_uniform": _key(_NUM, 3.0, min=0, max=1e4, doc="γ: the first λ is pulled towards uniform"),
    },
    "freeze_likelihood": _key(bool, False, doc="keep every λ fixed (e.g. when fine-tuning a learnt model)"),
    "freeze_bn": _key(bool, False, doc="keep batch-norm layers in eval mode (running statistics fixed)"),
    "seed": _key(int, 0),
    "output": _key((str, _NONE), None, doc="run directory (default runs/<config name>)"),
    "device": _key(str, "auto", doc="auto, cpu, cuda, cuda:N"),
    "threads": _key((int, _NONE), None, min=1, max=1024, doc="CPU threads of this process (torch.set_num_threads); "
                                                "null: torch's default. On a busy machine 1 can be much faster"),
    "amp": _key(bool, True, doc="mixed precision (CUDA only; bf16 where supported, else fp16)"),
    "channels_last": _key(bool, True, doc="channels_last memory format (CUDA only)"),
    "progress": _key(bool, True, doc="tqdm progress bars (on a terminal only: logs get no carriage-return lines)"),
    "log_interval": _key(int, 10, min=1, max=10**6, doc="steps between progress-bar updates of λ-KL"),
    "tensorboard": _key((bool, _NONE), None, doc="also log to TensorBoard: null (default) when it is installed, "
                                                 "true always (a warning when it is not), false never"),
    "save_model": _key(bool, True, doc="write the Hub-format model folder at the end"),
}

# Keys that may change when a run is resumed (they do not change what is computed).
RESUME_SAFE = {"device", "threads", "progress", "data.workers", "tensorboard", "log_interval", "output", "save_model"}


def _defaults(schema) -> dict:
    return {k: (_defaults(v) if isinstance(v, dict) else copy.deepcopy(v.default)) for k, v in schema.items()}


def default_config() -> dict:
    """Every key at its default."""
    return _defaults(SCHEMA)


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"unknown config key {where + key!r}{hint}; accepted keys{' in ' + where.rstrip('.') if where else ''}: "
                       f"{', '.join(sorted(known))}")


def _non_finite(value, path: str) -> str | None:
    """The first NaN or infinity inside a list or mapping, as a message (numbers themselves are the
    Spec's to check)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            return f"'{path}.{k}' must be a finite number, got {v}"
        found = _non_finite(v, f"{path}.{k}")
        if found is not None:
            return found
    return None


def _check_value(path: str, key: Key, value) -> None:
    bad = _non_finite(value, path)
    if bad is not None:
        raise ConfigError(f"config key {bad}")
    problem = key.problem(value)
    if problem is not None:
        raise ConfigError(f"config key {path!r} {problem}")


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)$")


def _yaml_number(v):
    """PyYAML follows YAML 1.1, which reads ``1e-3`` (no dot) as a string: take it as the number
    everybody means."""
    if isinstance(v, str) and _FLOAT.match(v.strip()):
        return float(v)
    if isinstance(v, dict):
        return {k: _yaml_number(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_yaml_number(x) for x in v]
    return v


def _merge(base: dict, new: dict, schema, where: str = "") -> None:
    if not isinstance(new, dict):
        raise ConfigError(f"config section {where.rstrip('.') or '<top>'!r} must be a mapping, got {new!r}")
    for k, v in new.items():
        if not isinstance(k, str) or k not in schema:
            raise _unknown(str(k), schema.keys(), where)
        if isinstance(schema[k], dict):
            _merge(base[k], v if v is not None else {}, schema[k], f"{where}{k}.")
        else:
            v = _yaml_number(v) if float in schema[k].types else v
            _check_value(where + k, schema[k], v)
            base[k] = copy.deepcopy(v)


def validate_config(cfg: dict) -> dict:
    """Fill in defaults and check every key, type and cross-key rule; returns the resolved config."""
    out = default_config()
    _merge(out, cfg or {}, SCHEMA)
    if not out["model"]:
        raise ConfigError("config key 'model' is required: a timm model name such as 'pe_resnet18' or 'resnet18'")
    from .data import DATASETS, check_data_config  # (torch: after the keys and types are checked)

    if not out["data"]["name"]:
        raise ConfigError(f"config key 'data.name' is required; accepted: {', '.join(DATASETS)}")
    check_data_config(out["data"])  # names, symmetries, sizes (the files: eqzoo.data.data_info, when a run starts)
    if out["schedule"]["warmup_epochs"] > out["schedule"]["epochs"]:
        raise ConfigError(f"config key 'schedule.warmup_epochs' ({out['schedule']['warmup_epochs']}) must not "
                          f"exceed schedule.epochs ({out['schedule']['epochs']})")
    sched = out["schedule"]
    if sched["min_lr"] > out["optim"]["lr"]:
        raise ConfigError(f"config key 'schedule.min_lr' ({sched['min_lr']}) must not exceed optim.lr "
                          f"({out['optim']['lr']})")
    ms = sched["decay_milestones"]
    if not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m <= 100_000 for m in ms):
        raise ConfigError(f"config key 'schedule.decay_milestones' must be a list of epochs in [1, 100000], got {ms!r}")
    _check_output(out["output"])
    dev = out["device"]
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"config key 'device' must be auto, cpu, cuda or cuda:N, got {dev!r}")
    out["model_args"] = _yaml_number(out["model_args"])
    out["optim"]["betas"] = _yaml_number(out["optim"]["betas"])
    for k in out["model_args"]:
        if not isinstance(k, str):
            raise ConfigError(f"config key 'model_args' must map names to values, got key {k!r}")
    bad = _non_finite(out["model_args"], "model_args")
    if bad is not None:
        raise ConfigError(f"config key {bad}")
    if "num_classes" in out["model_args"]:
        raise ConfigError("config key 'model_args.num_classes' is set from the data set: remove it")
    check_model_args(out["model"], out["model_args"])
    return out


def _check_output(output) -> None:
    """A run writes (and ``--overwrite`` deletes) its files in ``output``: it must be a folder of its
    own, never the current folder or one above it."""
    if output is None:
        return
    where = Path(output).expanduser()
    if not output.strip() or where.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise ConfigError(f"config key 'output' must name a run folder of its own (e.g. runs/NAME), not the current "
                          f"folder or one above it, got {output!r}")


def check_model_args(model: str, model_args: dict) -> None:
    """``model_args`` of an eqzoo model, checked now rather than when the model is built: the
    keys the model takes, and each value's type and range (see :mod:`eqzoo.validate`; strings
    are never booleans). For a pretrained source (``hf-hub:``, ``local-dir:``, a folder) the
    architecture is only known once its config.json is read: the values are checked."""
    from .models._schema import is_pe_architecture, model_arg_problem  # (timm and escnn)

    arch = model.split(".")[0]
    pe = ":" not in model and is_pe_architecture(arch)
    if not (pe or ":" in model or Path(model).is_dir()):
        return  # a plain timm model: timm checks its own arguments
    for key, value in model_args.items():
        if pe:
            problem = model_arg_problem(arch, key, value)
        else:
            try:
                check_arg(key, value)
                problem = None
            except ModelArgError as e:
                problem = e.problem
        if problem is not None:
            raise ConfigError(f"config key 'model_args.{key}' {problem}")


def parse_overrides(items) -> dict:
    """``["optim.lr=1e-3", "data.symmetry=[C1,SO2]"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-3)")
        key, text = item.split("=", 1)
        value = _yaml_number(parse_yaml(text, f"override {key}")) if text != "" else None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "model_args":
            _deep_update(base[k], v)
        elif isinstance(v, dict) and k == "model_args" and isinstance(base.get(k), dict):
            base[k].update(v)  # model_args.x=... adds to the file's model_args
        else:
            base[k] = v
    return base


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes, above the maximum of {MAX_CONFIG_BYTES} for a config")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping of keys, got {type(raw).__name__}")
    return raw


def load_config(source=None, overrides=None) -> dict:
    """Resolved config from a YAML path and/or a dict, plus ``key=value`` overrides (list or dict).

    ``output`` defaults to ``runs/<config file stem>``."""
    if isinstance(source, (str, os.PathLike)):
        raw = read_yaml(source)
        if raw.get("output") is None:
            raw["output"] = str(Path("runs") / Path(source).stem)
    else:
        raw = copy.deepcopy(source or {})
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    _deep_update(raw, copy.deepcopy(overrides or {}))
    cfg = validate_config(raw)
    if cfg["output"] is None:
        name = f"{cfg['model'].split(':')[-1].replace('/', '_')}-{cfg['data']['name']}"
        cfg["output"] = str(Path("runs") / name)
    return cfg


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "model_args":
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(prefix + k)
    return out
