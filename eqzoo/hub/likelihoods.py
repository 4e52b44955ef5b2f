"""likelihoods.json: every learnt likelihood λ of a saved model, readable without building it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .._version import __version__
from ..errors import HubConfigError
from ..likelihood import GroupLikelihood, likelihood_records
from ..models._schema import HUB_FORMAT, LIKELIHOODS_NAME
from ..sources import fetch, parse_source

__all__ = ["likelihood_record", "load_likelihoods"]


def likelihood_record(model_or_likelihoods) -> dict:
    """likelihoods.json content: the record of every distinct likelihood (keyed by its module path,
    see :meth:`GroupLikelihood.to_record`) and the format it is written in."""
    return {"hub_format": HUB_FORMAT, "eqzoo_version": __version__,
            "density": "λ w.r.t. the normalised Haar measure (uniform = 1); grid flip-major, theta in radians",
            "likelihoods": likelihood_records(model_or_likelihoods)}


def load_likelihoods(source: str | os.PathLike, raw: bool = False) -> dict:
    """The learnt distributions of a published model, without building it.

    ``source``: ``"hf-hub:ORG/NAME[@REV]"``, ``"local-dir:PATH"``, a folder or a likelihoods.json.
    Returns ``{name: GroupLikelihood}`` (each with ``.layers``, the module paths using it), or the
    parsed likelihoods.json with ``raw=True``."""
    if Path(os.fspath(source)).is_file():
        path, where = Path(source), os.fspath(source)
    else:
        kind, location = parse_source(source)
        path, where = fetch(kind, location, LIKELIHOODS_NAME), f"{kind}:{location}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["likelihoods"]
        if not isinstance(entries, dict):
            raise TypeError(f"'likelihoods' is a {type(entries).__name__}, not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} is not valid ({type(e).__name__}: {e})") from None
    if raw:
        return data
    return {name: GroupLikelihood.from_record(e, f"{where}: {LIKELIHOODS_NAME}: likelihood {name!r}")
            for name, e in entries.items()}
