"""The one way a pe model is built: ``build_pe_model``, eqzoo's ``build_model_with_cfg``.

Every entry function (``pe_resnet18``, ...) calls it, and it is the one place where
``pretrained=True``, ``hf-hub:`` and ``local-dir:`` sources go through:

1. the config.json timm parsed (``hf-hub:``/``local-dir:``; read once, by timm's reader, which
   eqzoo's :func:`read_timm_config` replaces) or, for a registry tag with an ``hf_hub_id``, the one
   it fetches, is validated before anything is built;
2. the weight file must be a complete safetensors file, the one config.json was saved with;
3. :func:`~eqzoo.models._checkpoint.checkpoint_filter` (timm's ``pretrained_filter_fn``) refuses weights made for other
   bases, sharing or head, and adapts a steerable stem to another ``in_chans``.
"""
from __future__ import annotations

import copy
import functools
import inspect
import json

from timm.models import _hub as timm_hub
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from .._io import check_safetensors, sha256
from ..errors import CheckpointError, HubConfigError, ModelArgError
from ..sources import fetch
from ..validate import check_arg, is_json
from ._checkpoint import checkpoint_filter
from ._pretrained import apply_published
from ._schema import (CONFIG_NAME, WEIGHTS_NAME, head_kind, is_pe_architecture, load_config_file,
                      register_architectures, validate_saved_config)

# Arguments that change the function a checkpoint's weights compute without changing their shapes
# (or that the entry function fills in, for the architecture ones): a load may not override them.
_FUNCTION_ARGS = ("group", "bandlimit", "out_bandlimit", "field_bandlimit", "share_likelihood", "basis",
                  "nonlinearity")
_ARCHITECTURE_ARGS = ("layers", "channels", "stem_width", "base_width", "block", "depth", "widen_factor")


class _CarryingCfg(dict):
    """The ``pretrained_cfg`` of an eqzoo model's config.json as timm passes it on (timm reads it as
    the dict it is), carrying the whole parsed file to the entry function as ``saved_config``."""

    saved_config: dict


def read_timm_config(json_file) -> dict:
    """timm's ``load_cfg_from_json`` for every config.json it reads: a damaged file raises
    :class:`HubConfigError` naming it (instead of a bare JSONDecodeError); an eqzoo model's
    pretrained_cfg carries the parsed file on to :func:`build_pe_model`, which so needs no second
    read."""
    cfg = load_config_file(json_file)
    if is_pe_architecture(cfg["architecture"]) and isinstance(cfg.get("pretrained_cfg"), dict):
        carrying = _CarryingCfg(cfg["pretrained_cfg"])
        carrying.saved_config = copy.deepcopy(cfg)
        cfg["pretrained_cfg"] = carrying
    return cfg


timm_hub.load_cfg_from_json = read_timm_config


def _plain(value):
    """A comparable JSON-like form (tuples as lists)."""
    return json.loads(json.dumps(value)) if is_json(value) else value


def _check_overrides(kwargs: dict, saved: dict, model_cls, source: str) -> None:
    """Refuse load-time arguments that differ from the checkpoint's model_args where that changes
    the function (timm merged the saved model_args into ``kwargs`` as defaults, so any difference
    was asked for). Fine-tuning may change num_classes, in_chans, drop rates and the pool."""
    defaults = {k: p.default for k, p in inspect.signature(model_cls).parameters.items()
                if p.default is not inspect.Parameter.empty}
    changed = []
    for key in _FUNCTION_ARGS + _ARCHITECTURE_ARGS:
        if key not in kwargs:
            continue
        if key in saved:
            want = saved[key]
        elif key in _FUNCTION_ARGS and key in defaults:
            want = defaults[key]
        else:
            continue  # an architecture default of the entry function: the weights' shapes check it
        if _plain(kwargs[key]) != _plain(want):
            changed.append(f"{key}={kwargs[key]!r} (the checkpoint's: {want!r})")
    # the head: compare what "auto" resolves to, so that an explicit equal head passes
    head_of = lambda a: head_kind(dict(defaults, **a))
    if "head" in kwargs and head_of(kwargs) != head_of(saved):
        changed.append(f"head={kwargs['head']!r} (the checkpoint's: {head_of(saved)!r})")
    if changed:
        raise HubConfigError(f"{source}: {', '.join(changed)} would change the function the weights compute; "
                             "drop these arguments to load the model as it was saved (fine-tuning may change "
                             "num_classes, in_chans, global_pool and the drop rates)")


def _checked_weights(kind: str, location: str, config: dict) -> None:
    """The source's model.safetensors must be complete and the file config.json was saved with (a
    folder mixed from two saves, or weights replaced by hand, would load silently otherwise)."""
    source = f"{kind}:{location}"
    try:
        path = fetch(kind, location, WEIGHTS_NAME)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}; eqzoo loads weights only from model.safetensors, never from pickle files such "
                              "as pytorch_model.bin. Save/publish it with eqzoo.save_pretrained or "
                              "eqzoo.push_to_hub.") from None
    check_safetensors(path, source)
    want = (config.get("eqzoo") or {}).get("weights_sha256")
    if want is not None and sha256(path) != want:  # folders saved before the hash was recorded: no check
        raise CheckpointError(f"{source}/{WEIGHTS_NAME} is not the file {CONFIG_NAME} was saved with (sha256 "
                              f"differs): the folder mixes two saves or its weights were replaced; save it again "
                              "with eqzoo.save_pretrained")


def _hub_config_of_tag(variant: str, kwargs: dict) -> tuple[str, str, dict] | None:
    """For ``pretrained=True`` with a registry cfg that has an ``hf_hub_id``: the Hub config.json
    (timm's registry path does not read it), whose model_args become defaults (explicit kwargs
    win) and whose num_classes becomes the cfg's so that timm keeps the classifier."""
    resolved = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    resolved = resolved.to_dict()
    file = resolved.get("file")
    if resolved.get("hf_hub_id") and not file and not resolved.get("state_dict"):
        location = resolved["hf_hub_id"]
        config = load_config_file(fetch("hf-hub", location, CONFIG_NAME))
        for key, value in config.get("model_args", {}).items():
            kwargs.setdefault(key, value)
        overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
        overlay.setdefault("num_classes", config.get("num_classes"))
        input_size = (config.get("pretrained_cfg") or {}).get("input_size")
        if input_size:
            overlay.setdefault("input_size", tuple(input_size))
        overlay["hf_hub_filename"] = WEIGHTS_NAME
        kwargs["pretrained_cfg_overlay"] = overlay
        return "hf-hub", location, config
    if file:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: eqzoo loads weights only from .safetensors files, never pickles")
        check_safetensors(file)
    elif resolved.get("url") and not resolved.get("state_dict"):
        raise CheckpointError(f"{variant}: pretrained url {resolved['url']} is not supported; eqzoo loads "
                              "weights from the Hub (hf_hub_id) or a local .safetensors file only")
    return None


def _saved_checkpoint(model_cls, variant: str, pretrained: bool, kwargs: dict) -> dict | None:
    """The checkpoint a build loads (``{"source", "eqzoo", "model_args"}`` of its config.json, or
    None), its config validated and, with ``pretrained``, its weight file checked. Updates
    ``kwargs`` for timm (safetensors weights only, a tag's saved model_args)."""
    cfg_in = kwargs.get("pretrained_cfg")
    kind = cfg_in.get("source") if isinstance(cfg_in, dict) else None
    if kind in ("hf-hub", "local-dir"):
        location = cfg_in["hf_hub_id"] if kind == "hf-hub" else cfg_in["file"]
        saved = getattr(cfg_in, "saved_config", None)
        if saved is None:  # a pretrained_cfg timm rebuilt (its script helpers do): read the file
            saved = load_config_file(fetch(kind, location, CONFIG_NAME))
        if kind == "hf-hub":  # weights from model.safetensors only, never a pickle fallback
            kwargs["pretrained_cfg"] = dict(cfg_in, hf_hub_filename=WEIGHTS_NAME)
    elif pretrained:
        found = _hub_config_of_tag(variant, kwargs)
        if found is None:
            return None
        kind, location, saved = found
    else:
        return None
    source = f"{kind}:{location}"
    validate_saved_config(saved, variant, source=f"{source}/{CONFIG_NAME}")
    if pretrained:  # without the weights, a changed architecture is only a new model
        _check_overrides(kwargs, saved.get("model_args", {}), model_cls, source)
        _checked_weights(kind, location, saved)
    return {"source": source, "eqzoo": saved.get("eqzoo", {}), "model_args": saved.get("model_args", {})}


def build_pe_model(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """Drop-in for timm's ``build_model_with_cfg`` in eqzoo's entry functions: validates the source
    config, checks the weight file and the bases (see the module docstring) and builds the model."""
    register_architectures(model_cls, variant)  # also for entry functions outside eqzoo
    output_stride = kwargs.pop("output_stride", None)
    if output_stride not in (None, 32):
        raise ModelArgError("output_stride", f"{output_stride!r} is not supported by pe models (only 32, timm's "
                            "default): timm makes stride-8/16 ResNets by dilating the last stages, and a dilated "
                            "steerable kernel has another basis (escnn's rings and frequency cut-offs depend on "
                            "the dilation), so the weights would not fit; take features at stride 32, or "
                            "upsample the input")
    kwargs = dict(kwargs)
    apply_published(variant, pretrained, kwargs)  # a published tag: its architecture, its checked weights
    checkpoint = _saved_checkpoint(model_cls, variant, pretrained, kwargs)
    for key in ("num_classes", "in_chans"):  # explicit overrides must make sense too
        if key in kwargs:
            check_arg(key, kwargs[key])
    filter_fn = functools.partial(checkpoint_filter, checkpoint=checkpoint,
                                  features_only=bool(kwargs.get("features_only")),
                                  then=kwargs.pop("pretrained_filter_fn", None))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except ModelArgError as e:
        if checkpoint is None:
            raise
        raise HubConfigError(f"{checkpoint['source']}/{CONFIG_NAME}: {e}") from None
