"""The saved-model format: file names, fingerprints, and the checks of a config.json.

A saved model is a folder in timm's Hub layout (``config.json``: ``architecture``,
``num_classes``, ``model_args``, ``pretrained_cfg``, plus a top-level ``eqzoo`` section with the
basis fingerprint and versions) next to ``model.safetensors``. This module says what a valid one
is; :mod:`eqzoo.models._builder` loads one and :mod:`eqzoo.hub` writes and publishes one.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import os
from pathlib import Path

import escnn
import timm
import torch
from timm.models import PretrainedCfg, is_model, model_entrypoint
from torch import nn

from .._version import __version__
from ..errors import HubConfigError, ModelArgError
from ..likelihood import GroupLikelihood
from ..validate import OPTIONS, is_json, options_where, type_ok
from ._layers import resolved_head

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LIKELIHOODS_NAME = "likelihoods.json"
PLOT_NAME = "likelihoods.png"
CARD_NAME = "README.md"
EXPORT_DIR = "exported"
HUB_FORMAT = 2  # version of eqzoo's additions to the layout; bump on incompatible changes (older ones are refused)

# create_model kwargs that describe a run, not the architecture: never saved as model_args
RUNTIME_ARGS = {"features_only", "out_indices", "feature_cls", "pretrained_model_args", "device", "dtype",
                "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict",
                "pretrained_filter_fn", "output_stride", "drop_block_rate", "feature_cfg", "basis_fingerprint"}
# The model_args entry through which timm's own save (timm.models.save_for_hf, which writes what the
# model records in ``_model_args``) pins the bases its weights were saved with; a load checks it as
# it checks the eqzoo section's fingerprint. eqzoo's own save records it in that section instead.
PINNED_BASES = "basis_fingerprint"


def versions() -> dict[str, str]:
    """eqzoo, escnn, timm, torch versions, as recorded in config.json and the card."""
    return {"eqzoo": __version__, "escnn": getattr(escnn, "__version__", "unknown"),
            "timm": timm.__version__, "torch": torch.__version__.split("+")[0]}


# -- fingerprints -----------------------------------------------------------------------------------
def layer_fingerprints(model: nn.Module) -> dict[str, str]:
    """``{module path: basis_fingerprint}`` of every eqzoo layer, in module order."""
    return {name: m.basis_fingerprint for name, m in model.named_modules()
            if isinstance(getattr(m, "basis_fingerprint", None), str)}


def basis_fingerprint(model: nn.Module) -> str:
    """One hash over all layers' basis fingerprints (and their paths): equal iff the model's
    precomputed bases are those the weights were trained with."""
    h = hashlib.sha256()
    for name, fp in layer_fingerprints(model).items():
        h.update(f"{name}={fp}\n".encode())
    return h.hexdigest()[:16]


def head_kind(model_args: dict) -> str:
    """The kind of classifier ``model_args`` build (what ``head="auto"`` resolves to)."""
    return resolved_head(model_args.get("head", "auto"), model_args.get("learn_likelihood", True))


def model_head(model: nn.Module) -> str:
    """The kind of classifier a pe model was built with."""
    return head_kind(getattr(model, "model_args", None) or {})


def _likelihood_layout(model: nn.Module) -> list[str]:
    """How the convolutions share their likelihoods: ``"path:k:group:L:L_out"``, k numbering the
    distinct likelihoods in module order (the classifier, which fine-tuning may replace, left out)."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    ids, layout = {}, []
    for name, m in model.named_modules():
        lam = getattr(m, "likelihood", None)
        if isinstance(lam, GroupLikelihood) and name != classifier:
            k = ids.setdefault(id(lam), len(ids))
            layout.append(f"{name}:{k}:{lam.group.spec}:{lam.bandlimit}:{lam.out_bandlimit}")
    return layout


def structure_fingerprint(model: nn.Module) -> str:
    """One hash over what the bases and the weights' shapes do not pin down but the function
    depends on: which layers share a likelihood (``share_likelihood``) and the kind of head. Loading
    one model's weights into another sharing would silently give other outputs."""
    h = hashlib.sha256("\n".join(_likelihood_layout(model) + [f"head={model_head(model)}"]).encode())
    return h.hexdigest()[:16]


# -- model_args ---------------------------------------------------------------------------------------
_ARCH_ARGS: dict[str, tuple[str, ...]] = {}  # architecture -> the options its class takes


def accepted_args(model_cls) -> tuple[str, ...]:
    """The options a pe model class takes: its constructor's named parameters (following
    ``**kwargs`` up the MRO) but the factory kwargs ``device``/``dtype``. Each is declared in
    :data:`eqzoo.validate.OPTIONS` (a test checks it)."""
    out: dict[str, None] = {}
    for cls in model_cls.__mro__:
        if cls.__init__ is object.__init__:
            break
        params = inspect.signature(cls.__init__).parameters
        for name, p in params.items():
            if name not in ("self", "device", "dtype") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(name)
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return tuple(out)


def register_architectures(model_cls, *architectures: str) -> None:
    """Record the model class of eqzoo entry functions, so that their config.json / training
    model_args are checked against the class's arguments before anything is built (an
    architecture keeps the class it was first registered with)."""
    for name in architectures:
        if name not in _ARCH_ARGS:
            _ARCH_ARGS[name] = accepted_args(model_cls)


def architecture_args(architecture: str) -> tuple[str, ...]:
    """The options a registered architecture's class takes (see :func:`register_architectures`)."""
    return _ARCH_ARGS.get(architecture, ())


def is_pe_architecture(architecture) -> bool:
    """A model registered with timm by eqzoo."""
    if not isinstance(architecture, str) or not is_model(architecture):
        return False
    return architecture in _ARCH_ARGS or model_entrypoint(architecture).__module__.startswith("eqzoo.")


def _known_args(architecture: str) -> tuple[str, ...]:
    # the arguments of a run (device, dtype, features_only, ...) are the caller's, never a config's
    common = options_where(common=True)
    return tuple(k for k in dict.fromkeys(_ARCH_ARGS.get(architecture, ()) + common) if k not in RUNTIME_ARGS)


def model_arg_problem(architecture: str, key: str, value) -> str | None:
    """What is wrong with one model_args entry of ``architecture`` (an unknown key, a wrong type
    or a value out of range; see :data:`eqzoo.validate.OPTIONS`), or None when it is fine."""
    known = _known_args(architecture)
    if key not in known:
        close = difflib.get_close_matches(key, list(known), n=1)
        return (f"is an unknown key for {architecture}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                f"known: {', '.join(sorted(known))}")
    if not is_json(value):
        return f"must be JSON data (finite numbers, strings, lists), got {value!r}"
    return OPTIONS[key].problem(value) if key in OPTIONS else None


def validate_model_args(architecture: str, model_args, where: str = "model_args") -> dict:
    """Check keys, types and ranges of a model_args dict (see :mod:`eqzoo.validate`: strings are
    never booleans, sizes are capped); returns it. Raises :class:`HubConfigError`."""
    if not isinstance(model_args, dict):
        raise HubConfigError(f"{where} must be a JSON object, got {type(model_args).__name__}")
    for key, value in model_args.items():
        problem = model_arg_problem(architecture, key, value)
        if problem is not None:
            raise HubConfigError(f"{where}[{key!r}] {problem}")
    return model_args


# -- config.json ----------------------------------------------------------------------------------------
def load_config_file(path: str | os.PathLike) -> dict:
    """Parse a config.json: a JSON object in timm's layout (``architecture`` a string,
    ``model_args`` / ``pretrained_cfg`` objects when present). A truncated, empty or non-object
    file raises :class:`HubConfigError` naming the file."""
    path = Path(path)
    fix = "it is truncated or corrupt: download or save it again"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HubConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    if not text.strip():
        raise HubConfigError(f"{path} is empty; {fix}")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise HubConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {fix}") from None
    except RecursionError:  # nesting past the parser's depth: no config of timm's layout is that deep
        raise HubConfigError(f"{path} is not a config of timm's layout (nested too deeply)") from None
    if not isinstance(cfg, dict):
        raise HubConfigError(f"{path}: expected a JSON object (timm's config layout), got {type(cfg).__name__}")
    if not isinstance(cfg.get("architecture"), str):
        raise HubConfigError(f"{path}: 'architecture' is missing or not a string")
    for key in ("model_args", "pretrained_cfg"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise HubConfigError(f"{path}: '{key}' must be a JSON object, got {type(cfg[key]).__name__}")
    return cfg


def validate_saved_config(cfg, architecture: str | None = None, source: str = CONFIG_NAME) -> dict:
    """Validate a parsed config.json before anything is built; returns it.

    Checks: a registered pe architecture (equal to ``architecture`` when given), ``num_classes``,
    ``model_args`` (known keys, right types), ``pretrained_cfg`` (only timm's fields) and the
    ``eqzoo`` section (format, fingerprint, versions)."""
    if not isinstance(cfg, dict):
        raise HubConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        raise HubConfigError(f"{source}: 'architecture' is missing or not a string")
    if architecture is not None and arch != architecture:
        raise HubConfigError(f"{source}: architecture {arch!r} does not match the model being built ({architecture!r})")
    if not is_pe_architecture(arch):
        raise HubConfigError(f"{source}: architecture {arch!r} is not a registered eqzoo model "
                             "(run `import eqzoo` before timm.create_model; pe_* models only)")
    if not type_ok(cfg.get("num_classes"), (int,)) or cfg["num_classes"] < 0:
        raise HubConfigError(f"{source}: 'num_classes' must be an int >= 0, got {cfg.get('num_classes')!r}")
    args = dict(cfg.get("model_args", {})) if isinstance(cfg.get("model_args", {}), dict) else cfg["model_args"]
    pinned = args.pop(PINNED_BASES, None) if isinstance(args, dict) else None  # see PINNED_BASES
    if pinned is not None and not (isinstance(pinned, str) and len(pinned) == 16 and pinned.isalnum()):
        raise HubConfigError(f"{source}: model_args['{PINNED_BASES}'] must be a basis fingerprint (16 hex digits), "
                             f"got {pinned!r}")
    args = validate_model_args(arch, args, f"{source}: model_args")
    if "num_classes" in args and args["num_classes"] != cfg["num_classes"]:
        raise HubConfigError(f"{source}: model_args num_classes={args['num_classes']} disagrees with "
                             f"num_classes={cfg['num_classes']}")
    pcfg = cfg.get("pretrained_cfg")
    if not isinstance(pcfg, dict):
        raise HubConfigError(f"{source}: no 'pretrained_cfg' object (timm's layout, which eqzoo.save_pretrained and "
                             "timm.models.save_for_hf write); save the model again with either")
    unknown = sorted(set(pcfg) - set(PretrainedCfg.__dataclass_fields__))
    if unknown:
        raise HubConfigError(f"{source}: pretrained_cfg has keys timm does not know: {unknown} "
                             "(custom metadata belongs in a top-level key of config.json)")
    meta = cfg.get("eqzoo")
    if meta is None and pinned is not None:
        return cfg  # saved by timm's save_for_hf: the model's bases are pinned by its model_args
    if not isinstance(meta, dict):
        raise HubConfigError(f"{source}: no 'eqzoo' section; this folder was not written by "
                             "eqzoo.save_pretrained / eqzoo.push_to_hub, so its bases cannot be checked")
    fmt = meta.get("hub_format")
    if not type_ok(fmt, (int,)):
        raise HubConfigError(f"{source}: eqzoo.hub_format must be an int, got {fmt!r}")
    if fmt > HUB_FORMAT:
        raise HubConfigError(f"{source}: written by eqzoo {meta.get('versions', {}).get('eqzoo', '?')} in hub "
                             f"format {fmt}; this eqzoo ({__version__}) reads format {HUB_FORMAT}. Upgrade eqzoo.")
    if fmt < HUB_FORMAT:
        raise HubConfigError(f"{source}: hub format {fmt} is older than the format {HUB_FORMAT} this eqzoo "
                             f"({__version__}) reads, which no published checkpoint predates; save the model "
                             "again with this eqzoo")
    for key in ("basis_fingerprint", "structure_fingerprint", "weights_sha256"):
        if not isinstance(meta.get(key), str):
            raise HubConfigError(f"{source}: eqzoo.{key} is missing; save the model again with eqzoo.save_pretrained")
    exported = meta.get("exported")
    if exported is not None:  # the plain counterpart: a timm architecture by name, never a source to fetch
        arch_ok = isinstance(exported, dict) and isinstance(exported.get("architecture"), str) and \
            is_model(exported["architecture"]) and not is_pe_architecture(exported["architecture"])
        if not arch_ok or exported.get("path") != EXPORT_DIR:
            raise HubConfigError(f"{source}: eqzoo.exported must be {{\"architecture\": a timm model name such as "
                                 f"\"resnet18\", \"path\": \"{EXPORT_DIR}\"}}, got {exported!r}")
    return cfg
