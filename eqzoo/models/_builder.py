"""The one way a pe model is built: ``build_pe_model``, eqzoo's ``build_model_with_cfg``.

Every entry function (``pe_resnet18``, ...) calls it, and it is the one place where
``pretrained=True``, ``hf-hub:`` and ``local-dir:`` sources go through:

1. the source's config.json (read here: timm read it to find the architecture, and passes on only
   its parts) is validated before anything is built, and load-time arguments that would change
   the function the weights compute are refused;
2. the weight file must be a complete safetensors file, the one config.json was saved with;
3. :func:`~eqzoo.models._checkpoint.checkpoint_filter` (timm's ``pretrained_filter_fn``) refuses
   weights made for other bases or head, and adapts a steerable stem to another ``in_chans``;
   the model's own ``load_state_dict`` refuses non-finite weights and weights saved with another
   likelihood sharing (every load passes there, ``checkpoint_path=`` included).
"""
from __future__ import annotations

import functools
import inspect
import json

from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from .._io import check_safetensors, sha256
from ..errors import CheckpointError, HubConfigError, ModelArgError, UnknownModelArgError
from ..sources import fetch
from ..validate import check_arg, is_json, options_where
from ._checkpoint import checkpoint_filter
from ._common import set_data_config
from ._pretrained import apply_published
from ._schema import (CONFIG_NAME, PINNED_BASES, RUNTIME_ARGS, WEIGHTS_NAME, architecture_args, head_kind,
                      load_config_file, register_architectures, validate_saved_config)

# What a load may not override: the options that change the function of the same weights, and
# those that change their shapes (checked against the checkpoint's when it records them).
_FUNCTION_ARGS = options_where(effect="function")
_ARCHITECTURE_ARGS = options_where(effect="architecture")


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
        if key not in kwargs or key == "head":
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
    head_of = lambda a: head_kind(dict(defaults, **a))  # noqa: E731
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
    if want is not None and sha256(path) != want:  # timm's own save records no hash: the bases are checked
        raise CheckpointError(f"{source}/{WEIGHTS_NAME} is not the file {CONFIG_NAME} was saved with (sha256 "
                              f"differs): the folder mixes two saves or its weights were replaced; save it again "
                              "with eqzoo.save_pretrained")


def _file_classes(file) -> int | None:
    """The classifier's class count in a safetensors file (the rows of ``fc.weight``), read from its
    header; None when it has no such tensor."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return f.get_slice("fc.weight").get_shape()[0] if "fc.weight" in f.keys() else None


def _registry_source(variant: str, kwargs: dict) -> tuple[str, str, dict] | None:
    """For ``pretrained=True`` from the registry: with an ``hf_hub_id``, the Hub config.json (timm's
    registry path does not read it), to be validated; with a ``file`` (``pretrained_cfg_overlay``),
    the file checked and its classifier's size made the cfg's, so that timm neither warns of the
    registry's class count nor re-initialises a head that fits."""
    resolved = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    resolved = resolved.to_dict()
    file = resolved.get("file")
    if resolved.get("hf_hub_id") and not file and not resolved.get("state_dict"):
        location = resolved["hf_hub_id"]
        kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, hf_hub_filename=WEIGHTS_NAME)
        return "hf-hub", location, load_config_file(fetch("hf-hub", location, CONFIG_NAME))
    if file:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: eqzoo loads weights only from .safetensors files, never pickles")
        check_safetensors(file)
        classes = _file_classes(file)
        if classes is not None:
            kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, num_classes=classes)
    elif resolved.get("url") and not resolved.get("state_dict"):
        raise CheckpointError(f"{variant}: pretrained url {resolved['url']} is not supported; eqzoo loads "
                              "weights from the Hub (hf_hub_id) or a local .safetensors file only")
    return None


def _saved_checkpoint(model_cls, variant: str, pretrained: bool, kwargs: dict) -> dict | None:
    """The checkpoint a build loads (``{"source", "eqzoo", "model_args"}`` of its config.json, or
    None), its config validated and, with ``pretrained``, its weight file checked. Updates
    ``kwargs`` for timm (safetensors weights only)."""
    cfg_in = kwargs.get("pretrained_cfg")
    kind = cfg_in.get("source") if isinstance(cfg_in, dict) else None
    if kind in ("hf-hub", "local-dir"):
        location = cfg_in["hf_hub_id"] if kind == "hf-hub" else cfg_in["file"]
        saved = load_config_file(fetch(kind, location, CONFIG_NAME))
        if kind == "hf-hub":  # weights from model.safetensors only, never a pickle fallback
            kwargs["pretrained_cfg"] = dict(cfg_in, hf_hub_filename=WEIGHTS_NAME)
    elif pretrained:
        found = _registry_source(variant, kwargs)
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
    meta = dict(saved.get("eqzoo") or {})
    meta.setdefault("basis_fingerprint", saved.get("model_args", {}).get(PINNED_BASES))  # timm's own save
    return {"source": source, "eqzoo": meta, "model_args": saved.get("model_args", {})}


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
    kwargs.pop(PINNED_BASES, None)  # a timm-saved folder's pin: checked from its config.json below
    apply_published(variant, pretrained, kwargs)  # a published tag: its architecture, its checked weights
    checkpoint = _saved_checkpoint(model_cls, variant, pretrained, kwargs)
    _check_keywords(variant, kwargs)
    for key in ("num_classes", "in_chans"):  # explicit overrides must make sense too
        if key in kwargs:
            check_arg(key, kwargs[key])
    filter_fn = functools.partial(checkpoint_filter, checkpoint=checkpoint,
                                  features_only=bool(kwargs.get("features_only")),
                                  then=kwargs.pop("pretrained_filter_fn", None))
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except ModelArgError as e:
        if checkpoint is None:
            raise
        raise HubConfigError(f"{checkpoint['source']}/{CONFIG_NAME}: {e}") from None
    except CheckpointError as e:  # from the model's load_state_dict: name the file
        name = _weights_name(checkpoint, kwargs, variant)
        if not pretrained or name in str(e) or (checkpoint is not None and checkpoint["source"] in str(e)):
            raise
        raise CheckpointError(f"{name}: {e}") from None
    set_data_config(model)  # the registry's 3-channel input fitted to in_chans (timm then warns of nothing)
    return model


def _weights_name(checkpoint: dict | None, kwargs: dict, variant: str) -> str:
    """The weight file a pretrained build loads, for messages."""
    if checkpoint is not None:
        return f"{checkpoint['source']}/{WEIGHTS_NAME}"
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    return str(overlay.get("file") or variant)


def _check_keywords(variant: str, kwargs: dict) -> None:
    """A keyword the model does not take (timm's ResNet keywords such as ``act_layer`` or
    ``stem_type``, a typo) is named in one line with what the model accepts."""
    accepted = architecture_args(variant)
    unknown = sorted(k for k in kwargs if k not in accepted and k not in RUNTIME_ARGS and k != "pretrained_filter_fn")
    if unknown:
        raise UnknownModelArgError(", ".join(unknown), f"{'is' if len(unknown) == 1 else 'are'} not supported by {variant} "
                            f"(pe models build every layer from the group's fields); it accepts: "
                            f"{', '.join(accepted)}")
