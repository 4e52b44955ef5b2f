"""The published checkpoints: registry tags such as ``pe_resnet18.d4_rotmnist``.

``published.json`` next to this module (written by ``scripts/release.py publish``, never by hand)
holds one entry per tag::

    {"format": 1, "tags": {"pe_resnet18.d4_rotmnist": {
        "hf_hub_id": "ORG/NAME", "revision": "<commit sha>", "sha256": "<sha256 of model.safetensors>",
        "model_args": {...}, "num_classes": 10, "input_size": [1, 33, 33], "mean": [0.0], "std": [1.0], ...}}}

What each field guards:

- ``model_args``: the tag's architecture lives here, not on the Hub, so ``create_model('arch.tag')``
  builds the same model with and without ``pretrained=True`` (as a timm tag does);
- ``revision``: the commit the weights were published at, so a later push to the repo's branch
  does not change what the tag loads;
- ``sha256``: checked whenever the tag's weights are loaded, so a repo rewritten at that revision
  is refused instead of loaded.

Only published checkpoints have tags. ``EQZOO_PUBLISHED=PATH`` (read when eqzoo is imported) makes
eqzoo use another registry file instead, e.g. a private release or a test's.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from timm.models import generate_default_cfgs, split_model_name_tag

from .._io import sha256, write_json
from ..errors import CheckpointError, HubConfigError
from ..sources import fetch
from ._schema import WEIGHTS_NAME

__all__ = ["REGISTRY_ENV", "REGISTRY_FILE", "REGISTRY_FORMAT", "registry_path", "read_registry", "write_registry",
           "published_default_cfgs", "published_entry", "apply_published", "check_published_weights", "PUBLISHED"]

REGISTRY_ENV = "EQZOO_PUBLISHED"
REGISTRY_FILE = Path(__file__).with_name("published.json")
REGISTRY_FORMAT = 1
_REQUIRED = {"hf_hub_id": str, "revision": str, "sha256": str, "model_args": dict, "num_classes": int,
             "input_size": list}
_OPTIONAL = {"mean": list, "std": list, "interpolation": str, "crop_pct": float, "description": str,
             "license": str, "dataset": str, "test_accuracy": float}
_HEX = re.compile(r"^[0-9a-f]+$")
# what loading may change without changing the function of the published weights
_LOAD_TIME_ARGS = ("num_classes", "in_chans", "global_pool", "drop_rate", "drop_path_rate")


def registry_path() -> Path:
    """The registry file in use: ``$EQZOO_PUBLISHED`` when set, else the package's."""
    return Path(os.environ[REGISTRY_ENV]) if os.environ.get(REGISTRY_ENV) else REGISTRY_FILE


def _check_entry(where: str, tag: str, entry) -> dict:
    bad = lambda what: HubConfigError(f"{where}: tag {tag!r}: {what}")  # noqa: E731
    arch, name = split_model_name_tag(tag)
    if not name or not arch:
        raise bad("a tag is ARCHITECTURE.NAME, e.g. pe_resnet18.d4_rotmnist")
    if not isinstance(entry, dict):
        raise bad(f"must be a mapping, got {type(entry).__name__}")
    unknown = set(entry) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}; accepted: {', '.join(sorted({**_REQUIRED, **_OPTIONAL}))}")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in entry:
            if key in _REQUIRED:
                raise bad(f"key {key!r} is missing")
            continue
        value = entry[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise bad(f"key {key!r} must be a {kind.__name__}, got {value!r}")
    if len(entry["revision"]) != 40 or not _HEX.match(entry["revision"]):
        raise bad(f"'revision' must be a full commit sha (40 hex digits, a branch could move), got "
                  f"{entry['revision']!r}")
    if len(entry["sha256"]) != 64 or not _HEX.match(entry["sha256"]):
        raise bad(f"'sha256' must be 64 hex digits, got {entry['sha256']!r}")
    if "/" not in entry["hf_hub_id"] or "@" in entry["hf_hub_id"]:
        raise bad(f"'hf_hub_id' must be ORG/NAME (the revision is its own key), got {entry['hf_hub_id']!r}")
    return entry


def read_registry(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The tags of a registry file (default :func:`registry_path`), checked; a missing file has none."""
    path = Path(path) if path is not None else registry_path()
    if not path.is_file():
        if path != REGISTRY_FILE:
            raise HubConfigError(f"{REGISTRY_ENV}={path}: no such registry file")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubConfigError(f"{path}: not a valid registry of published checkpoints ({e})") from None
    if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT or not isinstance(data.get("tags"), dict):
        raise HubConfigError(f"{path}: a registry is {{\"format\": {REGISTRY_FORMAT}, \"tags\": {{TAG: ENTRY}}}}; "
                             "write it with scripts/release.py publish")
    return {tag: _check_entry(str(path), tag, entry) for tag, entry in data["tags"].items()}


def write_registry(tags: dict[str, dict], path: str | os.PathLike) -> Path:
    """Write (replace) a registry file with these tags, each checked first."""
    path = Path(path)
    checked = {tag: _check_entry(str(path), tag, tags[tag]) for tag in sorted(tags)}
    write_json(path, {"format": REGISTRY_FORMAT, "tags": checked})
    return path


PUBLISHED: dict[str, dict] = read_registry()


def _pretrained_cfg(base: dict, entry: dict) -> dict:
    cfg = dict(base, hf_hub_id=f"{entry['hf_hub_id']}@{entry['revision']}", hf_hub_filename=WEIGHTS_NAME,
               num_classes=entry["num_classes"], input_size=tuple(entry["input_size"]))
    for key in ("interpolation", "crop_pct", "description", "license"):
        if key in entry:
            cfg[key] = entry[key]
    for key in ("mean", "std"):
        if key in entry:
            cfg[key] = tuple(entry[key])
    return cfg


def published_default_cfgs(cfgs: dict) -> dict:
    """timm's ``generate_default_cfgs`` of a model module's untagged ``cfgs``, plus a cfg for every
    published tag of those architectures. The untagged cfg stays each architecture's default:
    ``create_model('pe_resnet18')`` is the default architecture, whatever has been published."""
    archs = {split_model_name_tag(name)[0]: cfg for name, cfg in cfgs.items()}
    tags = {tag: _pretrained_cfg(archs[split_model_name_tag(tag)[0]], entry)
            for tag, entry in PUBLISHED.items() if split_model_name_tag(tag)[0] in archs}
    out = generate_default_cfgs({**cfgs, **tags})
    for arch in archs:
        order = out[arch].tags
        if "" in order:
            order.remove("")
            order.appendleft("")
    return out


def published_entry(variant: str, pretrained_cfg) -> tuple[str, dict] | None:
    """``(tag, entry)`` when a build names a published tag (timm passes the tag as a str
    ``pretrained_cfg``), else None."""
    if not isinstance(pretrained_cfg, str) or not pretrained_cfg:
        return None
    tag = f"{variant}.{pretrained_cfg}"
    return (tag, PUBLISHED[tag]) if tag in PUBLISHED else None


def check_published_weights(tag: str, entry: dict) -> Path:
    """The tag's weight file (downloaded, or from the cache offline) must be the published one."""
    location = f"{entry['hf_hub_id']}@{entry['revision']}"
    path = fetch("hf-hub", location, WEIGHTS_NAME)
    found = sha256(path)
    if found != entry["sha256"]:
        raise CheckpointError(f"{tag}: hf-hub:{location}/{WEIGHTS_NAME} is not the file that was published (sha256 "
                              f"{found[:16]}..., published {entry['sha256'][:16]}...): the repo was changed after "
                              f"publication, and eqzoo refuses to load it under this tag. Load a revision you trust "
                              f"explicitly with timm.create_model('hf-hub:ORG/NAME@REVISION', pretrained=True)")
    return path


def apply_published(variant: str, pretrained: bool, kwargs: dict) -> None:
    """For a published tag: its model_args set the architecture in ``kwargs`` (over the entry
    function's defaults, such as pe_resnet18's ``layers``), except what a fine-tune may change
    (``num_classes``, ``in_chans``, the pool and drop rates: given ones win); with ``pretrained`` its
    weights are checked against the published sha256."""
    found = published_entry(variant, kwargs.get("pretrained_cfg"))
    if found is None:
        return
    tag, entry = found
    for key, value in entry["model_args"].items():
        if key in _LOAD_TIME_ARGS:
            kwargs.setdefault(key, value)
        else:
            kwargs[key] = value
    if pretrained:
        check_published_weights(tag, entry)
