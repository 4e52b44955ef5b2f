"""Writing a model in the Hub layout: ``save_pretrained``.

A saved model is a folder in timm's Hub layout plus eqzoo's own files::

    config.json         timm's config (architecture, num_classes, model_args, pretrained_cfg) and a
                        top-level "eqzoo" key: basis and structure fingerprints, weights' sha256,
                        eqzoo/escnn/timm versions
    model.safetensors   the weights (safetensors only: nothing is ever pickled or unpickled)
    likelihoods.json    every learnt likelihood λ (see eqzoo.hub.likelihoods)
    likelihoods.png     the learnt distributions, one panel per likelihood
    README.md           the model card, rendered from eqzoo/MODEL_CARD.md
    exported/           plain timm weights + config (only when the model has a timm counterpart)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from timm.models import is_model
from timm.models import get_model_args
from torch import nn

from .._io import atomic_write, new_sibling_dir, replace_dir, save_tensors, sha256, write_json
from .._timm import save_config_for_hf
from ..errors import HubConfigError
from .._export import export as export_model
from ..models._schema import (CARD_NAME, CONFIG_NAME, EXPORT_DIR, HUB_FORMAT, LIKELIHOODS_NAME, PLOT_NAME,
                              RUNTIME_ARGS, WEIGHTS_NAME, basis_fingerprint, is_pe_architecture, layer_fingerprints,
                              model_head, structure_fingerprint, validate_model_args, versions)
from ..validate import is_json
from ..viz import plot_likelihoods
from .card import card_data_from_timm, check_card_data, render_model_card
from .likelihoods import likelihood_record

__all__ = ["save_pretrained", "hub_config", "model_args_of"]

_logger = logging.getLogger(__name__)
_DROP_RATES = ("drop_rate", "drop_path_rate")  # training settings: saved only when given explicitly
# What save_pretrained writes: a folder holding anything else is not replaced (it would be lost).
_SAVED_NAMES = {CONFIG_NAME, WEIGHTS_NAME, LIKELIHOODS_NAME, PLOT_NAME, CARD_NAME, EXPORT_DIR, ".gitattributes"}


def _as_json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json holds them


def _check_overrides(model: nn.Module, recorded: dict, model_args: dict) -> None:
    """``model_args`` replace what the model cannot record as JSON (a block class, say); a value
    that disagrees with the model's record would make config.json rebuild another model: refused
    ("auto" where the model was built with "auto" rebuilds the same)."""
    built = getattr(model, "model_args", None) or {}
    for key, value in model_args.items():
        if not (key in recorded and is_json(recorded[key]) and is_json(value)) or value == "auto" == built.get(key):
            continue
        if _as_json(value) != _as_json(recorded[key]):
            raise HubConfigError(f"model_args[{key!r}] = {value!r} disagrees with the model, which has {key} = "
                                 f"{recorded[key]!r}: config.json would rebuild another model. model_args= only "
                                 "replaces what the model cannot record as JSON (such as a block class); leave it out")


def model_args_of(model: nn.Module, model_args: dict | None = None) -> dict:
    """The constructor arguments that rebuild ``model`` from its architecture: the model's own
    record (``model.model_args``) updated with timm's record of the create_model kwargs and the
    current num_classes/in_chans/global_pool, then with explicit ``model_args`` (replacements for
    what is not JSON; a value that disagrees with the model is refused)."""
    args = {k: v for k, v in (getattr(model, "model_args", None) or {}).items() if is_json(v) and k not in _DROP_RATES}
    try:
        args.update(get_model_args(model))
    except Exception:  # not built by timm
        pass
    head = {"head": model_head(model)} if getattr(model, "model_args", None) is not None else {}
    _check_overrides(model, dict(args, **head), model_args or {})
    args.update(model_args or {})
    args = {k: v for k, v in args.items() if k not in RUNTIME_ARGS and not k.endswith("_drop_rate")}
    args.update(head)  # the head it has, not "auto"
    bad = [k for k, v in args.items() if not is_json(v)]
    if bad:
        raise HubConfigError(f"model_args {bad} are not JSON-serialisable: pass replacements via model_args=")
    return args


def _checked_model_config(model: nn.Module, model_config: dict | None) -> dict:
    """timm's ``model_config`` as eqzoo saves it: the class names (``label_names``, one per class,
    a list or ``{index: name}``) and ``label_descriptions`` (``{name: text}``)."""
    model_config = dict(model_config or {})
    unknown = sorted(set(model_config) - {"label_names", "label_descriptions"})
    if unknown:
        raise HubConfigError(f"model_config has keys {unknown}; eqzoo saves 'label_names' and 'label_descriptions' "
                             "(model arguments go in model_args=, input size, mean and std in data_config=)")
    names, n = model_config.get("label_names"), model.num_classes
    if isinstance(names, (list, tuple)):
        ok = len(names) == n and all(isinstance(v, str) for v in names)
    elif isinstance(names, dict):
        ok = all(isinstance(v, str) and str(k).isdecimal() and int(k) < n for k, v in names.items())
    else:
        ok = names is None
    if not ok:
        raise HubConfigError(f"model_config['label_names'] must be {n} class names (a list of strings, one per "
                             f"class, or {{index: name}} with indices below {n}), got {str(names)[:80]}")
    descriptions = model_config.get("label_descriptions")
    if descriptions is not None and not (isinstance(descriptions, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in descriptions.items())):
        raise HubConfigError("model_config['label_descriptions'] must map class names to texts ({name: text})")
    return model_config


def hub_config(model: nn.Module, model_args: dict | None = None, model_config: dict | None = None,
               data_config: dict | None = None) -> dict:
    """config.json for ``model``: timm's layout (``model_config`` and ``data_config`` as in timm's
    ``save_for_hf``) plus the top-level ``eqzoo`` key."""
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not is_pe_architecture(arch):
        raise HubConfigError(f"cannot save a model with architecture {arch!r}: build it with "
                             "timm.create_model('pe_...') after `import eqzoo`")
    if not layer_fingerprints(model):
        raise HubConfigError(f"cannot save this {arch}: it has no eqzoo layers (an eqzoo.export() result is a plain "
                             "model, which config.json could not rebuild); save the pe model itself, whose folder "
                             f"holds the plain weights in {EXPORT_DIR}/ when timm has the architecture")
    args = validate_model_args(arch, model_args_of(model, model_args))
    model_config = _checked_model_config(model, model_config)
    with tempfile.TemporaryDirectory() as tmp:
        # timm resolves the data config; runtime/non-JSON kwargs are replaced and dropped afterwards
        overrides = dict(args, **{k: None for k in getattr(model, "_model_args", {}) if k not in args})
        save_config_for_hf(model, Path(tmp) / CONFIG_NAME, model_config=model_config, model_args=overrides,
                           data_config=data_config)
        cfg = json.loads((Path(tmp) / CONFIG_NAME).read_text())
    cfg["model_args"] = args
    cfg["eqzoo"] = {"hub_format": HUB_FORMAT, "basis_fingerprint": basis_fingerprint(model),
                    "structure_fingerprint": structure_fingerprint(model),
                    "n_layers": len(layer_fingerprints(model)), "versions": versions(),
                    "files": {"likelihoods": LIKELIHOODS_NAME, "plot": PLOT_NAME}}
    return cfg


def _export(model: nn.Module, directory: Path) -> str | None:
    """Write exported/ (plain timm weights + config) when the model has a timm counterpart; returns
    the counterpart's architecture or None."""
    try:
        plain = export_model(model)
    except (NotImplementedError, ValueError, TypeError) as e:
        _logger.info("no plain-timm export for this model: %s", e)
        return None
    arch = (getattr(plain, "pretrained_cfg", None) or {}).get("architecture")
    if plain is model or not arch or not is_model(arch) or is_pe_architecture(arch):
        return None
    folder = directory / EXPORT_DIR
    save_tensors(plain.state_dict(), folder / WEIGHTS_NAME)

    def write_config(p):
        save_config_for_hf(plain, p)
        cfg = json.loads(p.read_text())
        cfg["pretrained_cfg"].pop("tag", None)  # the counterpart's registry tag: not these weights
        p.write_text(json.dumps(cfg, indent=2) + "\n")

    atomic_write(folder / CONFIG_NAME, write_config)
    return arch


def _model_to_save(model) -> nn.Module:
    """The model whose config.json and weights rebuild it: a ``torch.compile`` wrapper is saved as
    the model it wraps (its state_dict keys carry an ``_orig_mod.`` prefix); a timm feature
    extractor (``features_only=True``) is refused, since config.json builds the classifier model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_pretrained needs a torch.nn.Module, got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        model = inner
    if type(model).__module__.startswith("timm.models._features"):
        raise HubConfigError(f"cannot save a timm feature extractor ({type(model).__name__}, features_only=True): "
                             "its weights are named differently and config.json rebuilds the whole model; save the "
                             "model built without features_only, then load it with "
                             "timm.create_model('local-dir:DIR', pretrained=True, features_only=True)")
    return model


def _check_target(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder")
    foreign = sorted(p.name for p in directory.iterdir() if p.name not in _SAVED_NAMES) if directory.is_dir() else []
    if foreign:
        raise FileExistsError(f"{directory} holds files that are not part of a saved model ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}); a save replaces the whole folder: save into "
                              "a new or empty folder")


def _write_folder(model: nn.Module, folder: Path, cfg: dict, card_data: dict, repo_id, export: bool,
                  plot: bool) -> None:
    """Every file of the saved model into the empty ``folder`` (config.json last)."""
    record = likelihood_record(model)
    save_tensors(model.state_dict(), folder / WEIGHTS_NAME)
    cfg["eqzoo"]["weights_sha256"] = sha256(folder / WEIGHTS_NAME)
    write_json(folder / LIKELIHOODS_NAME, record)
    has_plot = plot and bool(record["likelihoods"])
    if has_plot:
        fig = plot_likelihoods(record)
        atomic_write(folder / PLOT_NAME, lambda p: fig.savefig(p, format="png", dpi=110))
    exported = _export(model, folder) if export else None
    if exported:
        cfg["eqzoo"]["exported"] = {"architecture": exported, "path": EXPORT_DIR}
    card = render_model_card(model, cfg, card_data, repo_id=repo_id, has_plot=has_plot)
    atomic_write(folder / CARD_NAME, lambda p: p.write_text(str(card), encoding="utf-8"))
    write_json(folder / CONFIG_NAME, cfg)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, model_config: dict | None = None,
                    model_args: dict | None = None, *, data_config: dict | None = None,
                    card_data: dict | None = None, model_card: dict | None = None, repo_id: str | None = None,
                    export: bool = True, plot: bool = True) -> Path:
    """Write ``model`` in the Hub layout (see the module docstring) to ``directory``; returns it.

    The arguments follow timm's ``save_for_hf`` (safetensors only: nothing is pickled). The folder
    is written next to ``directory`` and renamed into place when complete, so a reader (and a
    concurrent save) never sees a folder mixed from two saves; config.json records the weights'
    sha256, which loading checks. A ``directory`` holding other files is refused; a symbolic link
    is saved through, into its target.

    Args:
        model_config: ``label_names`` (one class name per class) and ``label_descriptions``,
            saved in config.json as timm does.
        model_args: replacements for constructor arguments the model cannot record as JSON; a
            value that disagrees with the model is refused.
        data_config: the input the weights expect (``input_size``, ``mean``, ``std``, ...), as
            timm's ``save_for_hf`` takes it.
        card_data: what the model card says (see :data:`eqzoo.hub.card.CARD_DATA_KEYS`):
            ``license``, ``datasets`` (Hub ids), ``dataset_name``, ``training`` (text),
            ``results`` (``{split: {"accuracy": value}}``), ``base_model``, ``description``, ``tags``.
        model_card: timm's ``model_card`` dict (description, details, license, tags, citation).
        repo_id: the Hub id the card's usage section names (default ``ORG/NAME``).
        export: also write ``exported/`` when the model has a plain timm counterpart.
    """
    directory = Path(directory)
    model = _model_to_save(model)
    _check_target(directory)
    card_data = check_card_data(dict(card_data_from_timm(model_card), **(card_data or {})))
    was_training = model.training
    model.eval()
    new = None
    try:
        cfg = hub_config(model, model_args, model_config, data_config)  # validates before any file is touched
        new = new_sibling_dir(directory)
        _write_folder(model, new, cfg, card_data, repo_id, export, plot)
        replace_dir(new, directory)
        new = None
    finally:
        model.train(was_training)
        if new is not None:  # failed half-way: nothing of it stays
            shutil.rmtree(new, ignore_errors=True)
    return directory
