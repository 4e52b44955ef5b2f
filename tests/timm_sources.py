"""timm's own test-suite and scripts for the tests that run them on eqzoo's models.

The wheel of timm has neither: its sdist has the test-suite (``tests/``), fetched here with pip for
the installed timm version and cached under ``$EQZOO_CACHE/timm-src`` (default
``~/.cache/eqzoo``). timm's scripts (``train.py``, ``validate.py``, ...) are only in timm's git
repository; ``$EQZOO_TIMM_SCRIPTS`` names a folder holding them (e.g. a checkout of the tag of the
installed version).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import timm

from eqzoo.kernels import cache_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_ENV = "EQZOO_TIMM_SCRIPTS"


def timm_sdist() -> Path:
    """The extracted sdist of the installed timm (fetched once through pip, then cached)."""
    version = timm.__version__
    root = cache_dir() / "timm-src"
    target = root / f"timm-{version}"
    if (target / "tests" / "test_models.py").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
               "--dest", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("timm-*.tar.gz"))
        if res.returncode != 0 or not tarballs:
            raise RuntimeError(f"could not fetch timm {version}'s sdist with `{' '.join(cmd)}` (it needs PyPI):\n"
                               f"{res.stderr[-2000:]}")
        with tarfile.open(tarballs[0]) as tf:
            # "data" refuses links and paths that leave the folder (Python >= 3.10.12 / 3.11.4)
            tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.replace(Path(tmp) / f"timm-{version}", target)  # whole or not at all
    return target


def timm_scripts() -> Path | None:
    """A folder with timm's ``train.py`` and ``validate.py``: ``$EQZOO_TIMM_SCRIPTS``, else the
    sdist if a timm version ships them there; None when neither has them."""
    candidates = [Path(os.environ[SCRIPTS_ENV])] if os.environ.get(SCRIPTS_ENV) else []
    candidates.append(timm_sdist())
    for folder in candidates:
        if (folder / "train.py").is_file() and (folder / "validate.py").is_file():
            return folder
    if os.environ.get(SCRIPTS_ENV):
        raise FileNotFoundError(f"${SCRIPTS_ENV}={os.environ[SCRIPTS_ENV]} has no train.py and validate.py")
    return None


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python that must import this checkout's eqzoo (not another
    installed copy) and the test helpers in ``tests/timm_suite``."""
    env = dict(os.environ, **extra)
    paths = [str(ROOT), str(ROOT / "tests" / "timm_suite")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
