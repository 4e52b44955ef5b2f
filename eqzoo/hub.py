r"""Hugging Face Hub: publish and load eqzoo models together with their learnt group distributions.

A saved model is a folder in timm's Hub layout plus eqzoo's own files::

    config.json         timm's config (architecture, num_classes, model_args, pretrained_cfg) and a
                        top-level "eqzoo" key: basis fingerprint, eqzoo/escnn/timm versions
    model.safetensors   the weights (safetensors only: nothing is ever pickled or unpickled)
    likelihoods.json    every learnt likelihood λ: the layers using it, group, band-limits,
                        Fourier coefficients, λ on a grid of the group, summary
    likelihoods.png     the learnt distributions, one panel per likelihood
    README.md           the model card, rendered from eqzoo/MODEL_CARD.md
    exported/           plain timm weights + config (only when the model has a timm counterpart)

Loading goes through timm (``import eqzoo`` first)::

    timm.create_model("hf-hub:org/name", pretrained=True)          # or "hf-hub:org/name@revision"
    timm.create_model("local-dir:/path/to/folder", pretrained=True)
    timm.create_model("pe_resnet18.tag", pretrained=True)           # registry cfg with hf_hub_id

timm reads ``config.json`` and calls eqzoo's entry function, which builds the model with
:func:`build_pe_model` instead of timm's ``build_model_with_cfg``. That is where the eqzoo checks
run: the config is validated before anything is built, the weight file must be a complete
safetensors file, and the bases the model is built with must have the fingerprint the weights were
trained with.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from torch import nn

from ._io import atomic_write, new_sibling_dir, replace_dir, save_tensors, write_json
from .regularizers import likelihoods as _likelihoods

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
LIKELIHOODS_NAME = "likelihoods.json"
PLOT_NAME = "likelihoods.png"
CARD_NAME = "README.md"
EXPORT_DIR = "exported"
HUB_FORMAT = 1  # version of eqzoo's additions to the layout; bump on incompatible changes
# Never uploaded by eqzoo and never loaded: pickle-based checkpoints and editor/temp files.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.tmp", ".*"]
_NONE = type(None)

# model_args every pe model understands, with the JSON types allowed for them. Further keys are
# allowed where the model class accepts them (see `_accepted_args`) or `register_model_args` adds them.
COMMON_MODEL_ARGS: dict[str, tuple] = {
    "group": (str,),
    "bandlimit": (int, _NONE),
    "out_bandlimit": (int, _NONE),
    "share_likelihood": (str, bool, _NONE),
    "learn_likelihood": (bool,),
    "head": (str,),
    "basis": (str,),
    "num_classes": (int,),
    "in_chans": (int,),
    "global_pool": (str,),
    "drop_rate": (float, int),
    "drop_path_rate": (float, int),
}
_EXTRA_MODEL_ARGS: dict[str, dict[str, tuple]] = {}  # architecture -> {key: types}
# create_model kwargs that describe a run, not the architecture: never saved as model_args
_RUNTIME_ARGS = {"features_only", "out_indices", "feature_cls", "pretrained_model_args", "device", "dtype",
                 "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_strict",
                 "pretrained_filter_fn", "output_stride", "drop_block_rate", "feature_cfg"}


class HubConfigError(ValueError):
    """config.json (or a model_args dict) is not one eqzoo can build from."""


class CheckpointError(RuntimeError):
    """A weight file is missing, truncated, corrupt, unsafe or made for other bases."""


class PushError(RuntimeError):
    """Uploading to the Hub failed (the local files are left as they were)."""


# -- versions and fingerprints --------------------------------------------------------------------
def versions() -> dict[str, str]:
    """eqzoo, escnn, timm, torch versions, as recorded in config.json and the card."""
    import escnn
    import timm

    from . import __version__

    return {"eqzoo": __version__, "escnn": getattr(escnn, "__version__", "unknown"),
            "timm": timm.__version__, "torch": torch.__version__.split("+")[0]}


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


def _likelihood_layout(model: nn.Module) -> tuple[list[str], str]:
    """How the convolutions share their likelihoods (``"path:k:group:L:L_out"``, k numbering the
    distinct likelihoods in module order) and the model's resolved head kind."""
    from .likelihood import GroupLikelihood
    from .models._layers import resolved_head

    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    ids, layout = {}, []
    for name, m in model.named_modules():
        lam = getattr(m, "likelihood", None)
        if isinstance(lam, GroupLikelihood) and name != classifier:  # the head may be replaced (fine-tuning)
            k = ids.setdefault(id(lam), len(ids))
            layout.append(f"{name}:{k}:{lam.group.spec}:{lam.bandlimit}:{lam.out_bandlimit}")
    pe = getattr(model, "pe_config", None) or {}
    return layout, resolved_head(pe.get("head", "auto"), pe.get("learn_likelihood", True))


def structure_fingerprint(model: nn.Module) -> str:
    """One hash over what the bases and the weights' shapes do not pin down but the function
    depends on: which layers share a likelihood (``share_likelihood``) and the kind of head. Loading
    one model's weights into another sharing would silently give other outputs."""
    layout, head = _likelihood_layout(model)
    h = hashlib.sha256("\n".join(layout + [f"head={head}"]).encode())
    return h.hexdigest()[:16]


# -- model_args -------------------------------------------------------------------------------------
def register_model_args(architecture: str, **types) -> None:
    """Declare extra model_args an architecture accepts, e.g.
    ``register_model_args("pe_wrn16_8", widen_factor=(int,), field_bandlimit=(int, type(None)))``."""
    _EXTRA_MODEL_ARGS.setdefault(architecture, {}).update(
        {k: v if isinstance(v, tuple) else (v,) for k, v in types.items()})


def _type_ok(value, types: tuple | None) -> bool:
    if types is None:  # any JSON value
        return _is_json(value)
    if isinstance(value, bool):  # bool is an int in Python, not in a config
        return bool in types
    if isinstance(value, (list, tuple)) and (list in types or tuple in types):
        return _is_json(value)
    return isinstance(value, types)


def _is_json(value) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


_ANNOTATION_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "None": (_NONE,)}


def _types_of(param: inspect.Parameter) -> tuple | None:
    """JSON types allowed for a constructor parameter, from its annotation or default (None: any)."""
    ann = param.annotation
    if ann is not inspect.Parameter.empty:
        text = str(getattr(ann, "__name__", ann)).replace("typing.", "").replace(" ", "")
        if text.startswith("Optional[") and text.endswith("]"):
            text = text[len("Optional["):-1] + "|None"
        names = text.split("|")
        if all(n in _ANNOTATION_TYPES for n in names):
            return tuple(t for n in names for t in _ANNOTATION_TYPES[n])
        return None
    default = param.default
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, (int, float, str)):
        return (float, int) if isinstance(default, float) else (type(default),)
    return None


def _accepted_args(model_cls) -> dict[str, tuple | None]:
    """Named constructor parameters of a model class, following ``**kwargs`` up its MRO."""
    out: dict[str, tuple | None] = {}
    classes = model_cls.__mro__ if isinstance(model_cls, type) else [model_cls]
    for cls in classes:
        init = cls.__init__ if isinstance(cls, type) else cls
        if init is object.__init__:
            break
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            break
        for name, p in params.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                out.setdefault(name, _types_of(p))
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return out


def _known_args(architecture: str, model_cls=None) -> dict[str, tuple | None]:
    known = dict(_accepted_args(model_cls)) if model_cls is not None else {}
    known.update(_ARCH_ARGS.get(architecture, {}))
    known.update(COMMON_MODEL_ARGS)
    known.update(_EXTRA_MODEL_ARGS.get(architecture, {}))
    # the arguments of a run (device, dtype, features_only, ...) are the caller's, never a config's
    return {k: v for k, v in known.items() if k not in _RUNTIME_ARGS}


_ARCH_ARGS: dict[str, dict[str, tuple | None]] = {}  # architecture -> its class's accepted args


def register_architectures(model_cls, *architectures: str) -> None:
    """Record the model class of eqzoo entry functions, so that their config.json / training
    model_args are checked against the class's arguments before anything is built."""
    for name in architectures:
        _ARCH_ARGS[name] = _accepted_args(model_cls)


def is_pe_architecture(architecture: str) -> bool:
    """A model registered with timm by eqzoo (or declared with :func:`register_model_args`)."""
    from timm.models import is_model, model_entrypoint

    if not isinstance(architecture, str) or not is_model(architecture):
        return False
    module = getattr(model_entrypoint(architecture), "__module__", "")
    return module.startswith("eqzoo.") or architecture in _EXTRA_MODEL_ARGS or architecture in _ARCH_ARGS


def model_arg_problem(architecture: str, key: str, value, model_cls=None) -> str | None:
    """What is wrong with one model_args entry of ``architecture`` (an unknown key, a wrong type
    or a value out of range; see :mod:`eqzoo.validate`), or None when it is fine."""
    from .validate import RULES, ModelArgError, check_arg

    known = _known_args(architecture, model_cls)
    if key not in known:
        import difflib

        close = difflib.get_close_matches(key, list(known), n=1)
        return (f"is an unknown key for {architecture}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                f"known: {', '.join(sorted(known))}")
    if key in RULES:
        try:
            check_arg(key, value)
        except ModelArgError as e:
            return e.problem
    elif not _type_ok(value, known[key]):
        want = " or ".join("null" if t is _NONE else t.__name__ for t in known[key]) if known[key] else "JSON"
        return f"must be {want}, got {value!r}"
    return None


def validate_model_args(architecture: str, model_args, model_cls=None, where: str = "model_args") -> dict:
    """Check keys, types and ranges of a model_args dict (see :mod:`eqzoo.validate`: strings are
    never booleans, sizes are capped); returns it. Raises :class:`HubConfigError`."""
    if not isinstance(model_args, dict):
        raise HubConfigError(f"{where} must be a JSON object, got {type(model_args).__name__}")
    for key, value in model_args.items():
        problem = model_arg_problem(architecture, key, value, model_cls)
        if problem is not None:
            raise HubConfigError(f"{where}[{key!r}] {problem}")
    return model_args


def validate_config(cfg, architecture: str | None = None, model_cls=None, source: str = CONFIG_NAME) -> dict:
    """Validate a parsed config.json before anything is built; returns it.

    Checks: a registered pe architecture (equal to ``architecture`` when given), ``num_classes``,
    ``model_args`` (known keys, right types), ``pretrained_cfg`` (only timm's fields) and the
    ``eqzoo`` section (format, fingerprint, versions)."""
    from timm.models import PretrainedCfg

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
    if not _type_ok(cfg.get("num_classes"), (int,)) or cfg["num_classes"] < 0:
        raise HubConfigError(f"{source}: 'num_classes' must be an int >= 0, got {cfg.get('num_classes')!r}")
    args = validate_model_args(arch, cfg.get("model_args", {}), model_cls, f"{source}: model_args")
    if "num_classes" in args and args["num_classes"] != cfg["num_classes"]:
        raise HubConfigError(f"{source}: model_args num_classes={args['num_classes']} disagrees with "
                             f"num_classes={cfg['num_classes']}")
    pcfg = cfg.get("pretrained_cfg", {})
    if not isinstance(pcfg, dict):
        raise HubConfigError(f"{source}: 'pretrained_cfg' must be a JSON object")
    fields = set(PretrainedCfg.__dataclass_fields__)
    unknown = sorted(set(pcfg) - fields)
    if unknown:
        raise HubConfigError(f"{source}: pretrained_cfg has keys timm does not know: {unknown} "
                             "(custom metadata belongs in a top-level key of config.json)")
    meta = cfg.get("eqzoo")
    if not isinstance(meta, dict):
        raise HubConfigError(f"{source}: no 'eqzoo' section; this folder was not written by "
                             "eqzoo.save_pretrained / eqzoo.push_to_hub, so its bases cannot be checked")
    fmt = meta.get("hub_format")
    if not _type_ok(fmt, (int,)):
        raise HubConfigError(f"{source}: eqzoo.hub_format must be an int, got {fmt!r}")
    if fmt > HUB_FORMAT:
        raise HubConfigError(f"{source}: written by eqzoo {meta.get('versions', {}).get('eqzoo', '?')} in hub "
                             f"format {fmt}; this eqzoo ({versions()['eqzoo']}) reads format <= {HUB_FORMAT}. "
                             "Upgrade eqzoo.")
    if not isinstance(meta.get("basis_fingerprint"), str):
        raise HubConfigError(f"{source}: eqzoo.basis_fingerprint is missing")
    return cfg


# -- reading a source -------------------------------------------------------------------------------
def parse_source(source: str | os.PathLike) -> tuple[str, str]:
    """``"hf-hub:org/name[@rev]"`` -> ("hf-hub", "org/name[@rev]"); ``"local-dir:PATH"`` or an existing
    folder -> ("local-dir", PATH)."""
    text = os.fspath(source)
    for prefix in ("hf-hub:", "local-dir:"):
        if text.startswith(prefix):
            return prefix[:-1], text[len(prefix):]
    if Path(text).is_dir():
        return "local-dir", text
    if not Path(text).exists() and (os.sep in text or text.startswith(".")):
        raise FileNotFoundError(f"{text}: no such folder (expected a saved model folder, "
                                "'hf-hub:ORG/NAME[@REVISION]' or 'local-dir:PATH')")
    raise ValueError(f"expected 'hf-hub:ORG/NAME[@REVISION]', 'local-dir:PATH' or a folder, got {text!r}")


def _fetch(kind: str, location: str, filename: str, what: str = "") -> Path:
    """Local path of ``filename`` from a Hub repo (downloaded/cached) or a folder."""
    if kind == "local-dir":
        if not Path(location).is_dir():
            raise FileNotFoundError(f"local-dir:{location}: no such folder")
        path = Path(location) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found{what}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = location.partition("@")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except EntryNotFoundError:
        raise FileNotFoundError(f"{filename} not found in Hub repo {location}{what}") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{filename} of {location} is not in the local cache and the Hub cannot be "
                                f"reached ({e.__class__.__name__}); connect once, or unset HF_HUB_OFFLINE") from None


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
    if not isinstance(cfg, dict):
        raise HubConfigError(f"{path}: expected a JSON object (timm's config layout), got {type(cfg).__name__}")
    if not isinstance(cfg.get("architecture"), str):
        raise HubConfigError(f"{path}: 'architecture' is missing or not a string")
    for key in ("model_args", "pretrained_cfg"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise HubConfigError(f"{path}: '{key}' must be a JSON object, got {type(cfg[key]).__name__}")
    return cfg


def _wrap_timm_config_reader() -> None:
    """timm parses config.json itself, before eqzoo's entry function runs, so a damaged file
    would surface as a bare JSONDecodeError, TypeError or KeyError without its path. timm's
    reader is wrapped so that such files raise :class:`HubConfigError` naming the file; valid
    files parse exactly as before."""
    from timm.models import _hub as timm_hub

    original = getattr(timm_hub, "load_cfg_from_json", None)
    if original is None or getattr(original, "_eqzoo_checked", False):
        return

    @functools.wraps(original)
    def load_cfg_from_json(json_file):
        load_config_file(json_file)  # only to raise the clear error
        return original(json_file)

    load_cfg_from_json._eqzoo_checked = True
    timm_hub.load_cfg_from_json = load_cfg_from_json


_wrap_timm_config_reader()


def read_config(source: str | os.PathLike, architecture: str | None = None, model_cls=None) -> dict:
    """Download/read and validate config.json of a ``hf-hub:``/``local-dir:`` source."""
    kind, location = parse_source(source)
    path = _fetch(kind, location, CONFIG_NAME)
    cfg = load_config_file(path)
    return validate_config(cfg, architecture, model_cls, source=f"{kind}:{location}/{CONFIG_NAME}")


def model_args_from_hub(pretrained_cfg) -> dict:
    """model_args stored in the Hub config.json of a registry cfg with ``hf_hub_id`` (a dict, a
    timm ``PretrainedCfg`` or the hub id itself), validated. For entry functions of tagged models:
    timm's registry path does not read config.json."""
    if isinstance(pretrained_cfg, str):
        hub_id = pretrained_cfg
    else:
        cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()
        hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise ValueError("pretrained_cfg has no hf_hub_id")
    return dict(read_config(f"hf-hub:{hub_id}").get("model_args", {}))


def check_safetensors(path: str | os.PathLike, source: str = "") -> Path:
    """Check that a file is a complete safetensors file (header parses, sizes add up) without
    loading it. Raises :class:`CheckpointError` naming the file and what to do."""
    path = Path(path)
    fix = (f"download it again (delete {path} from the Hugging Face cache or pass force_download) or "
           "re-publish it with eqzoo.push_to_hub") if source.startswith("hf-hub") else \
        "save it again with eqzoo.save_pretrained"
    name = f"{source}/{path.name}" if source else str(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{name} is not a valid safetensors file ({e}); {fix}") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "corrupt (trailing bytes)"
        raise CheckpointError(f"{name} is {state}: {size} bytes, expected {expected}; {fix}")
    return path


def _weights(kind: str, location: str) -> Path:
    """Path of the validated model.safetensors of a source; pickles are never considered."""
    pickles = "eqzoo loads weights only from model.safetensors, never from pickle files such as pytorch_model.bin"
    try:
        path = _fetch(kind, location, WEIGHTS_NAME)
    except FileNotFoundError as e:
        raise CheckpointError(f"{e}; {pickles}. Save/publish it with eqzoo.save_pretrained or eqzoo.push_to_hub.") from None
    return check_safetensors(path, f"{kind}:{location}")


# -- the load hook used by eqzoo's entry functions --------------------------------------------------
# Arguments that change the function a checkpoint's weights compute without changing their shapes
# (or that the entry function fills in, for the architecture ones): a load may not override them.
_FUNCTION_ARGS = ("group", "bandlimit", "out_bandlimit", "field_bandlimit", "share_likelihood", "basis")
_ARCHITECTURE_ARGS = ("layers", "channels", "stem_width", "base_width", "block", "depth", "widen_factor")


def _plain(value):
    """A comparable JSON-like form (tuples as lists)."""
    return json.loads(json.dumps(value)) if _is_json(value) else value


def _check_overrides(kwargs: dict, saved: dict, model_cls, source: str) -> None:
    """Refuse load-time arguments that differ from the checkpoint's model_args where that changes
    the function (timm merged the saved model_args into ``kwargs`` as defaults, so any difference
    was asked for). Fine-tuning may change num_classes, in_chans, drop rates and the pool."""
    from .models._layers import resolved_head

    defaults = {}
    if model_cls is not None:
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
    head_of = lambda a: resolved_head(a.get("head", defaults.get("head", "auto")), a.get("learn_likelihood", True))
    if "head" in kwargs and head_of(kwargs) != head_of(saved):
        changed.append(f"head={kwargs['head']!r} (the checkpoint's: {head_of(saved)!r})")
    if changed:
        raise HubConfigError(f"{source}: {', '.join(changed)} would change the function the weights compute; "
                             "drop these arguments to load the model as it was saved (fine-tuning may change "
                             "num_classes, in_chans, global_pool and the drop rates)")


def prepare_pretrained(variant: str, pretrained: bool, kwargs: dict, model_cls=None) -> tuple[dict, dict | None]:
    """Run before building a pe model: returns ``(kwargs, checkpoint)``.

    - ``hf-hub:``/``local-dir:`` sources (timm already merged config.json's model_args into
      kwargs): config.json is validated (architecture, model_args, eqzoo section) before building,
      and arguments that would change the function of the saved weights are refused.
    - registry cfgs with an ``hf_hub_id`` and ``pretrained=True``: the Hub config.json is read and
      validated, its model_args become defaults (explicit kwargs win), its num_classes becomes the
      cfg's so that timm keeps the classifier, and only ``model.safetensors`` will be loaded.
    - with ``pretrained=True`` the weight file is fetched and checked to be complete safetensors
      and, when config.json records its hash, the file config.json was saved with.
    ``checkpoint`` (``{"source", "eqzoo", "model_args"}`` of config.json, or None) goes to
    :func:`checkpoint_filter`.
    """
    from timm.models import resolve_pretrained_cfg

    kwargs = dict(kwargs)
    if model_cls is not None:
        _ARCH_ARGS.setdefault(variant, _accepted_args(model_cls))
    cfg_in = kwargs.get("pretrained_cfg")
    kind = cfg_in.get("source") if isinstance(cfg_in, dict) else None
    config = None
    if kind in ("hf-hub", "local-dir"):
        location = cfg_in["hf_hub_id"] if kind == "hf-hub" else cfg_in["file"]
        config = read_config(f"{kind}:{location}", variant, model_cls)
        if pretrained:  # without the weights, a changed architecture is only a new model
            _check_overrides(kwargs, config.get("model_args", {}), model_cls, f"{kind}:{location}")
        if kind == "hf-hub":  # weights from model.safetensors only, never a pickle fallback
            kwargs["pretrained_cfg"] = dict(cfg_in, hf_hub_filename=WEIGHTS_NAME)
    elif pretrained:
        resolved = resolve_pretrained_cfg(variant, cfg_in, kwargs.get("pretrained_cfg_overlay")).to_dict()
        file = resolved.get("file")
        if resolved.get("hf_hub_id") and not file and not resolved.get("state_dict"):
            kind, location = "hf-hub", resolved["hf_hub_id"]
            config = read_config(f"hf-hub:{location}", variant, model_cls)
            for key, value in config.get("model_args", {}).items():
                kwargs.setdefault(key, value)
            _check_overrides(kwargs, config.get("model_args", {}), model_cls, f"hf-hub:{location}")
            overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
            overlay.setdefault("num_classes", config["num_classes"])
            input_size = config.get("pretrained_cfg", {}).get("input_size")
            if input_size:
                overlay.setdefault("input_size", tuple(input_size))
            overlay["hf_hub_filename"] = WEIGHTS_NAME
            kwargs["pretrained_cfg_overlay"] = overlay
        elif file:
            if not str(file).endswith(".safetensors"):
                raise CheckpointError(f"{file}: eqzoo loads weights only from .safetensors files, never pickles")
            check_safetensors(file)
        elif resolved.get("url") and not resolved.get("state_dict"):
            raise CheckpointError(f"{variant}: pretrained url {resolved['url']} is not supported; eqzoo loads "
                                  "weights from the Hub (hf_hub_id) or a local .safetensors file only")
    from .validate import check_arg

    for key in ("num_classes", "in_chans"):  # explicit overrides must make sense too
        if key in kwargs:
            check_arg(key, kwargs[key])
    if config is None:
        return kwargs, None
    if pretrained:
        _check_weights_hash(_weights(kind, location), config, f"{kind}:{location}")
    return kwargs, {"source": f"{kind}:{location}", "eqzoo": config.get("eqzoo", {}),
                    "model_args": config.get("model_args", {})}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_weights_hash(path: Path, config: dict, source: str) -> None:
    """The weight file must be the one config.json was saved with (a folder mixed from two saves,
    or weights replaced by hand, would otherwise load into the wrong architecture silently)."""
    want = (config.get("eqzoo") or {}).get("weights_sha256")
    if want is None:  # folders saved before the hash was recorded
        return
    if _sha256(path) != want:
        raise CheckpointError(f"{source}/{WEIGHTS_NAME} is not the file {CONFIG_NAME} was saved with (sha256 "
                              f"differs): the folder mixes two saves or its weights were replaced; save it again "
                              "with eqzoo.save_pretrained")


def _adapt_stem(state_dict: dict, model: nn.Module) -> None:
    """timm adapts 4-D stem weights to another ``in_chans``; eqzoo's stems hold steerable weights
    (coefficients ``[d_out * d_in * H, F_out, F_in]``, with F_in = C_in on trivial input fields):
    adapt them the same way along the one input-channel axis that differs (sum for one channel,
    else repeat and rescale by ``C_pretrained / C_in``). The filter is linear in the coefficients, so it is adapted alike."""
    first = model.pretrained_cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else (first or ()):
        key = f"{name}.weight"
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        w, target = state_dict.get(key), getattr(module, "weight", None)
        in_type = getattr(module, "in_type", None)
        if w is None or target is None or in_type is None or in_type.size != len(in_type):
            continue  # not an eqzoo stem on trivial fields (timm handles plain convs itself)
        dims = [i for i, (a, b) in enumerate(zip(w.shape, target.shape)) if a != b]
        if w.dim() != target.dim() or len(dims) != 1:
            continue
        d = dims[0]
        c_old, c_new = w.shape[d], target.shape[d]
        if c_new == 1:
            w = w.sum(dim=d, keepdim=True)
        else:
            reps = [1] * w.dim()
            reps[d] = -(-c_new // c_old)
            w = w.repeat(*reps).narrow(d, 0, c_new) * (c_old / c_new)
        state_dict[key] = w
        input_size = model.pretrained_cfg.get("input_size") or (c_old, 224, 224)
        model.pretrained_cfg["input_size"] = (c_new, *input_size[1:])
        _logger.info("adapted the stem %s from %d to %d input channels", name, c_old, c_new)


def checkpoint_filter(state_dict: dict, model: nn.Module, checkpoint: dict | None = None,
                      features_only: bool = False, then=None) -> dict:
    """timm ``pretrained_filter_fn`` for pe models (runs after the build, before ``load_state_dict``):
    refuses weights made for other bases, another likelihood sharing or head, and integer tensors
    where the model has floats (``load_state_dict`` would cast them silently); warns when the
    classifier is re-initialised; adapts a steerable stem to another ``in_chans``; ``then`` is a
    further filter of the model's own."""
    if checkpoint is not None:
        expected, source = checkpoint["eqzoo"], checkpoint["source"]
        ours = basis_fingerprint(model)
        if ours != expected.get("basis_fingerprint"):
            saved = expected.get("versions", {})
            raise CheckpointError(
                f"basis fingerprint mismatch: the weights were trained with bases {expected.get('basis_fingerprint')} "
                f"(eqzoo {saved.get('eqzoo', '?')}, escnn {saved.get('escnn', '?')}), this model builds bases {ours} "
                f"(eqzoo {versions()['eqzoo']}, escnn {versions()['escnn']}). Loading would give silently wrong "
                "outputs: install the versions the checkpoint was saved with, or rebuild the model with the saved "
                "model_args.")
        structure = expected.get("structure_fingerprint")
        if structure is not None and structure != structure_fingerprint(model):
            args = checkpoint["model_args"]
            share, head = getattr(model, "pe_config", {}).get("share_likelihood"), _likelihood_layout(model)[1]
            raise CheckpointError(
                f"{source}: this model shares its likelihoods or has a head other than the checkpoint's (saved "
                f"share_likelihood={args.get('share_likelihood', 'layer')!r}, head={args.get('head', 'auto')!r}; "
                f"this model: share_likelihood={share!r}, head={head!r}). "
                "Loading would give silently different outputs: build it with the saved model_args.")
        ref = model.state_dict()
        for key, t in state_dict.items():
            if key in ref and torch.is_tensor(t) and t.is_floating_point() != ref[key].is_floating_point():
                raise CheckpointError(f"{source}/{WEIGHTS_NAME}: tensor {key!r} is {t.dtype} where the model has "
                                      f"{ref[key].dtype}; eqzoo does not cast weights between integer and float "
                                      "types: save the model again with eqzoo.save_pretrained")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier")
    n_old, n_new = cfg.get("num_classes"), getattr(model, "num_classes", None)
    if not features_only and classifier and n_old is not None and n_new is not None and n_old != n_new:
        _logger.warning("re-initialising the classifier %s: the checkpoint has %d classes, the model %d "
                        "(fine-tuning); every other weight and likelihood is loaded", classifier, n_old, n_new)
    _adapt_stem(state_dict, model)
    if then is not None:
        state_dict = then(state_dict, model)
    return state_dict


def build_pe_model(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """Drop-in for timm's ``build_model_with_cfg`` in eqzoo's entry functions: validates the source
    config, checks the weight file and the bases (see :func:`prepare_pretrained`,
    :func:`checkpoint_filter`) and records ``model.model_args`` when the model has none."""
    from timm.models import build_model_with_cfg

    from .validate import ModelArgError

    output_stride = kwargs.pop("output_stride", None)
    if output_stride not in (None, 32):
        raise ModelArgError("output_stride", f"{output_stride!r} is not supported by pe models (only 32, timm's "
                            "default): timm makes stride-8/16 ResNets by dilating the last stages, and a dilated "
                            "steerable kernel has another basis (escnn's rings and frequency cut-offs depend on "
                            "the dilation), so the weights would not fit; take features at stride 32, or "
                            "upsample the input")
    kwargs, checkpoint = prepare_pretrained(variant, pretrained, kwargs, model_cls)
    filter_fn = functools.partial(checkpoint_filter, checkpoint=checkpoint,
                                  features_only=bool(kwargs.get("features_only")),
                                  then=kwargs.pop("pretrained_filter_fn", None))
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn, **kwargs)
    except ModelArgError as e:
        if checkpoint is None:
            raise
        raise HubConfigError(f"{checkpoint['source']}/{CONFIG_NAME}: {e}") from None
    if not isinstance(getattr(model, "model_args", None), dict):
        # what rebuilds it: the constructor kwargs that are architecture, not run, and JSON
        model.model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
                            if k not in _RUNTIME_ARGS and not k.endswith("_drop_rate") and _is_json(v)}
    return model


# -- saving -----------------------------------------------------------------------------------------
def model_args_of(model: nn.Module, model_args: dict | None = None) -> dict:
    """The constructor arguments that rebuild ``model`` from its architecture: ``model.model_args``
    (set by the entry function) or timm's record of the create_model kwargs, updated with the
    current num_classes/in_chans/global_pool and with explicit ``model_args``."""
    from timm.models._input import get_model_args

    args = dict(getattr(model, "model_args", None) or {})
    try:
        current = get_model_args(model)
    except Exception:  # not built by timm
        current = {}
    args.update(current)
    args.update(model_args or {})
    args = {k: v for k, v in args.items() if k not in _RUNTIME_ARGS and not k.endswith("_drop_rate")}
    pe = getattr(model, "pe_config", None)
    if pe is not None:  # the head it has, not "auto": what "auto" means may depend on other arguments
        from .models._layers import resolved_head

        args["head"] = resolved_head(pe.get("head", "auto"), pe.get("learn_likelihood", True))
    bad = [k for k, v in args.items() if not _is_json(v)]
    if bad:
        raise HubConfigError(f"model_args {bad} are not JSON-serialisable: pass replacements via model_args=")
    return args


def hub_config(model: nn.Module, model_args: dict | None = None) -> dict:
    """config.json for ``model``: timm's layout plus the top-level ``eqzoo`` key."""
    from timm.models._hub import save_config_for_hf

    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not is_pe_architecture(arch):
        raise HubConfigError(f"cannot save a model with architecture {arch!r}: build it with "
                             "timm.create_model('pe_...') after `import eqzoo`")
    if not layer_fingerprints(model):
        raise HubConfigError(f"cannot save this {arch}: it has no eqzoo layers (an eqzoo.export() result is a plain "
                             "model, which config.json could not rebuild); save the pe model itself, whose folder "
                             f"holds the plain weights in {EXPORT_DIR}/ when timm has the architecture")
    args = validate_model_args(arch, model_args_of(model, model_args))
    with tempfile.TemporaryDirectory() as tmp:
        # timm resolves the data config; runtime/non-JSON kwargs are replaced and dropped afterwards
        overrides = dict(args, **{k: None for k in getattr(model, "_model_args", {}) if k not in args})
        save_config_for_hf(model, Path(tmp) / CONFIG_NAME, model_args=overrides)
        cfg = json.loads((Path(tmp) / CONFIG_NAME).read_text())
    cfg["model_args"] = args
    cfg["eqzoo"] = {"hub_format": HUB_FORMAT, "basis_fingerprint": basis_fingerprint(model),
                    "structure_fingerprint": structure_fingerprint(model),
                    "n_layers": len(layer_fingerprints(model)), "versions": versions(),
                    "files": {"likelihoods": LIKELIHOODS_NAME, "plot": PLOT_NAME}}
    return cfg


def likelihood_record(model_or_likelihoods) -> dict:
    """likelihoods.json content: for every distinct likelihood (keyed by its module path) the layers
    using it, its group, band-limits, coefficients, λ on a grid of the group and its summary."""
    from . import __version__
    from .likelihood import GroupLikelihood

    if isinstance(model_or_likelihoods, GroupLikelihood):
        model_or_likelihoods = {"likelihood": model_or_likelihoods}
    if isinstance(model_or_likelihoods, nn.Module):
        lams = _likelihoods(model_or_likelihoods)
        users = {}
        for name, m in model_or_likelihoods.named_modules():
            lam = getattr(m, "likelihood", None)
            if isinstance(lam, GroupLikelihood):
                users.setdefault(id(lam), []).append(name)
        layers = {key: users.get(id(lam), []) for key, lam in lams.items()}
    else:
        lams = dict(model_or_likelihoods)
        layers = {key: list(getattr(lam, "layers", [])) for key, lam in lams.items()}
    out = {}
    for key, lam in lams.items():
        G = lam.group
        s, theta = G.grid(None if G.is_finite else lam.grid_density().numel() // G.n_flip)
        out[key] = {
            "layers": layers[key],
            "group": G.spec,
            "bandlimit": lam.bandlimit,
            "out_bandlimit": lam.out_bandlimit,
            "learnable": lam.learnable,
            "coefficients": [float(c) for c in lam.coefficients.detach().cpu().double()],
            "frequencies": [list(f) for f in lam._freqs],
            "grid": {"flip": [int(v) for v in s], "theta": [round(float(t), 8) for t in theta],
                     "density": [float(v) for v in lam.grid_density().detach().cpu().double()]},
            "summary": lam.summary(),
        }
    return {"hub_format": HUB_FORMAT, "eqzoo_version": __version__,
            "density": "λ w.r.t. the normalised Haar measure (uniform = 1); grid flip-major, theta in radians",
            "likelihoods": out}


def _export(model: nn.Module, directory: Path) -> str | None:
    """Write exported/ (plain timm weights + config) when the model has a timm counterpart; returns
    the counterpart's architecture or None."""
    from timm.models import is_model
    from timm.models._hub import save_config_for_hf

    try:
        from .export import export
    except ImportError:
        return None
    try:
        plain = export(model)
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


# What save_pretrained writes: a folder holding anything else is not replaced (it would be lost).
_SAVED_NAMES = {CONFIG_NAME, WEIGHTS_NAME, LIKELIHOODS_NAME, PLOT_NAME, CARD_NAME, EXPORT_DIR, ".gitattributes"}


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


def save_pretrained(model: nn.Module, directory: str | os.PathLike, model_args: dict | None = None,
                    card_data: dict | None = None, repo_id: str | None = None, export: bool = True,
                    plot: bool = True) -> Path:
    """Write ``model`` in the Hub layout (see the module docstring) to ``directory``; returns it.

    The folder is written next to ``directory`` and renamed into place when complete, so a reader
    (and a concurrent save) never sees a folder mixed from two saves; config.json records the
    weights' sha256, which loading checks. A ``directory`` holding other files is refused.

    Args:
        model_args: constructor arguments to record on top of ``model.model_args``/timm's record.
        card_data: what the model card says about training: ``license``, ``datasets`` (Hub ids),
            ``dataset_name``, ``training`` (text), ``results`` (``{metric: value}``), ``split``,
            ``description``, ``tags``.
        repo_id: the Hub id the card's usage section names (default ``ORG/NAME``).
        export: also write ``exported/`` when the model has a plain timm counterpart.
    """
    directory = Path(directory)
    model = _model_to_save(model)
    _check_target(directory)
    was_training = model.training
    model.eval()
    new = None
    try:
        cfg = hub_config(model, model_args)  # validates before any file is touched
        record = likelihood_record(model)
        new = new_sibling_dir(directory)
        save_tensors(model.state_dict(), new / WEIGHTS_NAME)
        cfg["eqzoo"]["weights_sha256"] = _sha256(new / WEIGHTS_NAME)
        write_json(new / LIKELIHOODS_NAME, record)
        if plot and record["likelihoods"]:
            from .viz import plot_likelihoods

            fig = plot_likelihoods(record)
            atomic_write(new / PLOT_NAME, lambda p: fig.savefig(p, format="png", dpi=110))
        exported = _export(model, new) if export else None
        if exported:
            cfg["eqzoo"]["exported"] = {"architecture": exported, "path": EXPORT_DIR}
        card = render_model_card(model, cfg, card_data or {}, repo_id=repo_id, has_plot=plot and bool(record["likelihoods"]))
        atomic_write(new / CARD_NAME, lambda p: p.write_text(str(card), encoding="utf-8"))
        write_json(new / CONFIG_NAME, cfg)
        replace_dir(new, directory)
        new = None
    finally:
        model.train(was_training)
        if new is not None:  # failed half-way: nothing of it stays
            shutil.rmtree(new, ignore_errors=True)
    return directory


def _redact(text: str, token: str | None) -> str:
    from huggingface_hub import get_token

    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def upload_folder(directory: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
                  token: str | None = None, commit_message: str = "Upload eqzoo model"):
    """Upload a saved folder (as written by :func:`save_pretrained`) to ``repo_id``; returns the
    CommitInfo. Creates the repo (and the ``revision`` branch) if needed. Pickles are never
    uploaded; files of a stale ``exported/`` are deleted. Token: ``token`` or the standard HF login."""
    from huggingface_hub import HfApi

    from . import __version__

    directory = Path(directory)
    api = HfApi(token=token, library_name="eqzoo", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=directory, revision=revision,
                                 commit_message=commit_message, ignore_patterns=IGNORE_PATTERNS,
                                 delete_patterns=[f"{EXPORT_DIR}/*"])
    except Exception as e:  # the token must never show up in an error
        raise PushError(_redact(f"uploading {directory} to {repo_id}{'@' + revision if revision else ''} failed: "
                                f"{type(e).__name__}: {e}. The local files are unchanged; retry with "
                                f"`eqzoo publish {directory} {repo_id}`.", token)) from None


def push_to_hub(model: nn.Module, repo_id: str, revision: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str = "Upload eqzoo model", model_args: dict | None = None,
                card_data: dict | None = None, save_directory: str | os.PathLike | None = None):
    """Save ``model`` (to ``save_directory``, else a temporary folder) and upload it to ``repo_id``.
    Returns the CommitInfo (``.oid`` is the commit to pin with ``hf-hub:repo_id@oid``)."""
    with tempfile.TemporaryDirectory(prefix="eqzoo-push-") as tmp:
        folder = Path(save_directory) if save_directory is not None else Path(tmp)
        save_pretrained(model, folder, model_args=model_args, card_data=card_data, repo_id=repo_id)
        return upload_folder(folder, repo_id, revision=revision, private=private, token=token,
                             commit_message=commit_message)


def publish(directory: str | os.PathLike, repo_id: str, revision: str | None = None, private: bool = False,
            token: str | None = None, commit_message: str = "Upload eqzoo model", check: bool = True):
    """Upload a saved folder with its card. With ``check`` it is first loaded back (config
    validated, weights complete, bases matching), so what is published loads."""
    import timm

    directory = Path(directory)
    read_config(f"local-dir:{directory}")
    _weights("local-dir", str(directory))
    if not (directory / CARD_NAME).is_file():
        raise FileNotFoundError(f"{directory / CARD_NAME} missing: write the folder with eqzoo.save_pretrained")
    if check:
        timm.create_model(f"local-dir:{directory}", pretrained=True)
    return upload_folder(directory, repo_id, revision=revision, private=private, token=token,
                         commit_message=commit_message)


# -- reading the distributions only ------------------------------------------------------------------
def _check_likelihood_entry(e, where: str) -> None:
    """An entry of a downloaded likelihoods.json, checked before a GroupLikelihood is built from
    it (a group of order 10**6 would take the machine's memory)."""
    from .validate import ModelArgError, check_arg

    if not isinstance(e, dict):
        raise HubConfigError(f"{where} must be a JSON object, got {type(e).__name__}")
    for key in ("group", "bandlimit", "out_bandlimit", "coefficients"):
        if key not in e:
            raise HubConfigError(f"{where} has no {key!r}")
    try:
        for key in ("group", "bandlimit", "out_bandlimit"):
            check_arg(key, e[key])
    except ModelArgError as err:
        raise HubConfigError(f"{where}: {err}") from None
    if not isinstance(e.get("learnable", True), bool):
        raise HubConfigError(f"{where}: 'learnable' must be true or false, got {e['learnable']!r}")
    c = e["coefficients"]
    if not (isinstance(c, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in c)):
        raise HubConfigError(f"{where}: 'coefficients' must be a list of numbers")
    layers = e.get("layers", [])
    if not (isinstance(layers, list) and all(isinstance(v, str) for v in layers)):
        raise HubConfigError(f"{where}: 'layers' must be a list of module paths")


def load_likelihoods(source: str | os.PathLike, raw: bool = False) -> dict:
    """The learnt distributions of a published model, without building it.

    ``source``: ``"hf-hub:ORG/NAME[@REV]"``, ``"local-dir:PATH"``, a folder or a likelihoods.json.
    Returns ``{name: GroupLikelihood}`` (each with ``.layers``, the module paths using it), or the
    parsed likelihoods.json with ``raw=True``."""
    from .likelihood import GroupLikelihood

    if Path(os.fspath(source)).is_file():
        path, where = Path(source), os.fspath(source)
    else:
        kind, location = parse_source(source)
        path, where = _fetch(kind, location, LIKELIHOODS_NAME), f"{kind}:{location}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["likelihoods"]
        if not isinstance(entries, dict):
            raise TypeError(f"'likelihoods' is a {type(entries).__name__}, not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} is not valid ({type(e).__name__}: {e})") from None
    if raw:
        return data
    out = {}
    for name, e in entries.items():
        _check_likelihood_entry(e, f"{where}: {LIKELIHOODS_NAME}: likelihood {name!r}")
        lam = GroupLikelihood(e["group"], e["bandlimit"], e["out_bandlimit"], learnable=e.get("learnable", True))
        coeffs = torch.tensor(e["coefficients"], dtype=lam.coefficients.dtype)
        if coeffs.shape != lam.coefficients.shape:
            raise HubConfigError(f"{where}: likelihood {name!r} has {coeffs.numel()} coefficients, "
                                 f"{lam.coefficients.numel()} expected for {e['group']} at band-limit {e['bandlimit']}")
        with torch.no_grad():
            lam.coefficients.copy_(coeffs)
        lam.layers = list(e.get("layers", []))
        out[name] = lam
    return out


# -- the model card ----------------------------------------------------------------------------------
# The card template ships inside the package (package data), so that an installed eqzoo renders
# the same card as a checkout; the repository's top-level MODEL_CARD.md is a link to this file.
CARD_TEMPLATE = Path(__file__).resolve().parent / "MODEL_CARD.md"


def _results_table(results: dict) -> str:
    if not results:
        return ""
    lines = ["| metric | value |", "|---|--:|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    return "\n".join(lines)


def render_model_card(model: nn.Module, cfg: dict, card_data: dict | None = None, repo_id: str | None = None,
                      has_plot: bool = True, template_path: str | os.PathLike | None = None):
    """The model card (a huggingface_hub ``ModelCard``) rendered from MODEL_CARD.md: front matter
    (library_name timm, tags with eqzoo and the group, license, datasets, model-index results), usage,
    the plot, the per-layer degree-of-equivariance table, training data, results and versions."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .analysis import degree_of_equivariance, format_table

    info = dict(card_data or {})
    known = {"license", "datasets", "dataset_name", "training", "results", "split", "description", "tags",
             "model_name", "base_model", "task"}
    unknown = set(info) - known
    if unknown:
        raise ValueError(f"card_data has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    arch = cfg["architecture"]
    args = cfg.get("model_args", {})
    rows = degree_of_equivariance(model)
    groups = sorted({r["group"] for r in rows}) or ([args["group"]] if "group" in args else [])
    repo_id = repo_id or f"ORG/{arch}"
    model_name = info.get("model_name") or repo_id.split("/")[-1]
    datasets = info.get("datasets") or []
    datasets = [datasets] if isinstance(datasets, str) else list(datasets)
    results = dict(info.get("results") or {})
    dataset_name = info.get("dataset_name") or (datasets[0] if datasets else None)
    task = info.get("task", "image-classification")
    evals = [EvalResult(task_type=task, dataset_type=datasets[0] if datasets else dataset_name,
                        dataset_name=dataset_name, dataset_split=info.get("split"), metric_type=k, metric_value=v)
             for k, v in results.items() if isinstance(v, (int, float))] if dataset_name else []
    tags = ["image-classification", "timm", "eqzoo", "equivariance", "partial-equivariance", "steerable-cnn"]
    tags += [g.lower() for g in groups] + list(info.get("tags") or [])
    data = ModelCardData(library_name="timm", license=info.get("license", "apache-2.0"),
                         tags=list(dict.fromkeys(tags)), datasets=datasets or None,
                         metrics=list(results) or None, eval_results=evals or None,
                         model_name=model_name if evals else None, base_model=info.get("base_model"),
                         pipeline_tag=task)
    template = Path(template_path) if template_path else CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found"
                                + ("" if template_path else ": this eqzoo install lacks its package data "
                                   "(eqzoo/MODEL_CARD.md); reinstall eqzoo"))
    n_params = sum(p.numel() for p in model.parameters())
    meta = cfg["eqzoo"]
    kwargs = dict(
        model_name=model_name, repo_id=repo_id, architecture=arch, group=", ".join(groups) or "?",
        model_args=json.dumps(args, sort_keys=True), num_params=f"{n_params / 1e6:.2f}",
        num_classes=cfg.get("num_classes"), input_size=cfg.get("pretrained_cfg", {}).get("input_size"),
        description=info.get("description", ""), has_plot=has_plot, plot_file=PLOT_NAME,
        likelihood_table=format_table(rows), n_likelihoods=len(rows), training=info.get("training", ""),
        dataset_name=dataset_name, datasets=datasets, results_table=_results_table(results),
        exported_architecture=(meta.get("exported") or {}).get("architecture"), export_dir=EXPORT_DIR,
        versions=meta["versions"], basis_fingerprint=meta["basis_fingerprint"],
    )
    return ModelCard.from_template(data, template_path=str(template), **kwargs)
