"""likelihoods.json: every learnt likelihood λ of a saved model, readable without building it.

The file may come from the Hub, so it is read within fixed bounds (size, number of entries) and
every number in it must be finite; a coefficient must also fit the float32 the model uses.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .._version import __version__
from ..errors import HubConfigError
from ..likelihood import GroupLikelihood, likelihood_records
from ..models._schema import HUB_FORMAT, LIKELIHOODS_NAME
from ..sources import fetch, parse_source

__all__ = ["likelihood_record", "load_likelihoods", "MAX_LIKELIHOODS_BYTES", "MAX_LIKELIHOODS"]

# The largest real file (pe_resnet101 over O(2), one λ per layer) is about 3 MB with ~100 entries.
MAX_LIKELIHOODS_BYTES = 16 * 2**20
MAX_LIKELIHOODS = 1024
_FLOAT32_MAX = torch.finfo(torch.float32).max


def likelihood_record(model_or_likelihoods) -> dict:
    """likelihoods.json content: the record of every distinct likelihood (keyed by its module path,
    see :meth:`GroupLikelihood.to_record`) and the format it is written in."""
    return {"hub_format": HUB_FORMAT, "eqzoo_version": __version__,
            "density": "λ w.r.t. the normalised Haar measure (uniform = 1); grid flip-major, theta in radians",
            "likelihoods": likelihood_records(model_or_likelihoods)}


def _non_finite(obj) -> tuple[str, float] | None:
    """The path and value of the first number in ``obj`` (parsed JSON) that is not finite."""
    stack = [("", obj)]
    while stack:  # iterative: the depth of parsed JSON is not bounded by the recursion limit
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return path, value
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


def _check_entry(name: str, entry, where: str) -> None:
    bad = _non_finite(entry)
    if bad is not None:
        raise HubConfigError(f"{where}: likelihood {name!r}: {bad[0]} is {bad[1]}; every number must be finite")
    coefficients = entry.get("coefficients") if isinstance(entry, dict) else None
    if isinstance(coefficients, list):
        for i, c in enumerate(coefficients):
            if isinstance(c, (int, float)) and not isinstance(c, bool) and abs(c) > _FLOAT32_MAX:
                raise HubConfigError(f"{where}: likelihood {name!r}: coefficients[{i}] is {c:g}, beyond float32's "
                                     f"range (|c| <= {_FLOAT32_MAX:.4g})")


def _read(path: Path, where: str) -> dict:
    size = path.stat().st_size
    if size > MAX_LIKELIHOODS_BYTES:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} is {size / 2**20:.1f} MiB, above the maximum of "
                             f"{MAX_LIKELIHOODS_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["likelihoods"]
        if not isinstance(entries, dict):
            raise TypeError(f"'likelihoods' is a {type(entries).__name__}, not an object")
    except RecursionError:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} is not valid (nested too deeply)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} is not valid ({type(e).__name__}: {e})") from None
    if len(entries) > MAX_LIKELIHOODS:
        raise HubConfigError(f"{where}: {LIKELIHOODS_NAME} has {len(entries)} likelihoods, above the maximum of "
                             f"{MAX_LIKELIHOODS}")
    for name, entry in entries.items():
        _check_entry(name, entry, f"{where}: {LIKELIHOODS_NAME}")
    return data


def load_likelihoods(source: str | os.PathLike, raw: bool = False) -> dict:
    """The learnt distributions of a published model, without building it.

    ``source``: ``"hf-hub:ORG/NAME[@REV]"``, ``"local-dir:PATH"``, a folder or a likelihoods.json.
    Returns ``{name: GroupLikelihood}`` (each with ``.layers``, the module paths using it), or the
    parsed likelihoods.json with ``raw=True``. A file above the bounds above, or with a number
    that is not finite, raises :class:`HubConfigError` naming the file and the entry."""
    if Path(os.fspath(source)).is_file():
        path, where = Path(source), os.fspath(source)
    else:
        kind, location = parse_source(source)
        path, where = fetch(kind, location, LIKELIHOODS_NAME), f"{kind}:{location}"
    data = _read(path, where)
    if raw:
        return data
    out = {}
    for name, entry in data["likelihoods"].items():
        lam = GroupLikelihood.from_record(entry, f"{where}: {LIKELIHOODS_NAME}: likelihood {name!r}")
        with torch.no_grad():
            if not torch.isfinite(lam.grid_density()).all():
                raise HubConfigError(f"{where}: {LIKELIHOODS_NAME}: likelihood {name!r}: its coefficients give a "
                                     "density that is not finite")
        out[name] = lam
    return out
