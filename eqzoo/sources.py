"""Where a saved model comes from: one resolver for every way of naming one.

A model is named by ``hf-hub:ORG/NAME[@REVISION]``, ``local-dir:PATH``, a folder written by
:func:`eqzoo.save_pretrained`, a run folder (whose model is in its ``hub/``), or a timm model name
(``pe_resnet18``, ``pe_resnet18.tag``). :func:`resolve_model` turns any of these into what
``timm.create_model`` takes, and :func:`fetch` gives the local path of one file of a source.
"""
from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

__all__ = ["HUB_DIR", "parse_source", "model_folder", "resolve_model", "fetch"]

HUB_DIR = "hub"  # the Hub-format model folder inside a run folder
_CONFIG = "config.json"
_PREFIXED = "'hf-hub:ORG/NAME[@REVISION]' or 'local-dir:PATH'"


def _looks_like_path(name: str) -> bool:
    # timm model names never hold a path separator, nor start with a dot or a tilde
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def model_folder(path: str | os.PathLike) -> Path | None:
    """The Hub-format folder of a saved-model or run folder (config.json in it or in its hub/)."""
    p = Path(path)
    for candidate in (p, p / HUB_DIR):
        if (candidate / _CONFIG).is_file():
            return candidate
    return None


def resolve_model(name: str) -> str:
    """What ``timm.create_model`` takes for ``name``: a saved-model or run folder becomes
    ``local-dir:`` of its Hub-format folder; ``hf-hub:``, ``local-dir:`` and timm names pass.
    A path that does not exist is an error here (it would otherwise be taken for a model name)."""
    if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).is_dir():
        raise FileNotFoundError(f"{name}: no such folder")
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    folder = model_folder(name)
    if folder is not None:
        return f"local-dir:{folder}"
    if Path(name).exists():
        raise FileNotFoundError(f"{name} has no config.json (nor {HUB_DIR}/config.json): not a run or a model folder "
                                "(a run writes its model when it finishes; eqzoo.save_pretrained writes one)")
    if _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such run or model folder")
    return name


def parse_source(source: str | os.PathLike) -> tuple[str, str]:
    """``(kind, location)`` of a saved model, as :func:`resolve_model` finds it:
    ``"hf-hub:org/name[@rev]"`` -> ("hf-hub", "org/name[@rev]"); ``"local-dir:PATH"``, a saved-model
    or a run folder -> ("local-dir", its Hub-format folder)."""
    spec = resolve_model(os.fspath(source))
    kind, prefixed, location = spec.partition(":")
    if not prefixed:
        raise ValueError(f"expected {_PREFIXED} or a folder, got {spec!r}")
    return kind, location


def fetch(kind: str, location: str, filename: str) -> Path:
    """Local path of ``filename`` from a Hub repo (downloaded or cached) or a folder."""
    if kind == "local-dir":
        if not Path(location).is_dir():
            raise FileNotFoundError(f"local-dir:{location}: no such folder")
        path = Path(location) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found")
        return path
    repo_id, _, revision = location.partition("@")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: the file was never looked up online
        if constants.is_offline_mode():
            raise FileNotFoundError(f"{filename} of hf-hub:{location} is not in the offline cache (HF_HUB_OFFLINE "
                                    "is set): download it once with the Hub reachable, or unset HF_HUB_OFFLINE"
                                    ) from None
        raise FileNotFoundError(f"{filename} of hf-hub:{location} is not in the local cache and the Hub cannot be "
                                "reached: connect once to download it") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{filename} not found in Hub repo {location}") from None
