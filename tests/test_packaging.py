"""eqzoo installed from a wheel or an sdist, outside the checkout, works and ships its package
data: the model card a saved model writes is rendered from the real template (eqzoo/MODEL_CARD.md,
which the repository's top-level MODEL_CARD.md links to)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Run by the installed copy: save a tiny model and render its card once with the installed
# default template and once with the checkout's file; print both so that the test compares them.
CHILD = r'''
import sys, timm, torch, eqzoo
from pathlib import Path
from eqzoo.hub import CARD_NAME, hub_config, render_model_card
assert Path(eqzoo.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), eqzoo.__file__
torch.manual_seed(0)
model = timm.create_model("pe_wrn16_8", channels=(8, 8, 8, 8), num_classes=2)
out = eqzoo.save_pretrained(model, sys.argv[2], export=False, plot=False)
written = (out / CARD_NAME).read_text(encoding="utf-8")
reference = str(render_model_card(model.eval(), hub_config(model), has_plot=False, template_path=sys.argv[3]))
print("SAME" if written == reference else "DIFFERENT")
'''


def _run(cmd, **kwargs):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kwargs)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


def _source_tree(dest: Path) -> Path:
    """What a clone has for building (copied, so that the build leaves nothing in the checkout)."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    os.symlink(os.readlink(ROOT / "MODEL_CARD.md"), dest / "MODEL_CARD.md")
    shutil.copytree(ROOT / "eqzoo", dest / "eqzoo", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _card_from_install(wheel: Path, tmp_path: Path, name: str) -> str:
    site = tmp_path / f"site-{name}"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel])
    assert (site / "eqzoo" / "MODEL_CARD.md").is_file()
    env = dict(os.environ, PYTHONPATH=str(site))  # the installed copy, never the checkout
    res = _run([sys.executable, "-c", CHILD, site, tmp_path / f"saved-{name}", ROOT / "eqzoo" / "MODEL_CARD.md"],
               cwd=tmp_path, env=env)
    return res.stdout.strip().splitlines()[-1]


def test_wheel_and_sdist_ship_the_card_template(tmp_path):
    assert (ROOT / "MODEL_CARD.md").resolve() == (ROOT / "eqzoo" / "MODEL_CARD.md").resolve()
    src = _source_tree(tmp_path / "src")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]

    _run([*pip_wheel, "-w", tmp_path / "wheel", src])
    (wheel,) = (tmp_path / "wheel").glob("eqzoo-*.whl")
    assert _card_from_install(wheel, tmp_path, "wheel") == "SAME"

    # the sdist (setuptools' PEP 517 hook, no network), and a wheel built from it
    sdist_dir = tmp_path / "sdist"
    _run([sys.executable, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
          sdist_dir], cwd=src)
    (sdist,) = sdist_dir.glob("eqzoo-*.tar.gz")
    with tarfile.open(sdist) as tf:
        assert any(n.endswith("/eqzoo/MODEL_CARD.md") for n in tf.getnames())
    _run([*pip_wheel, "-w", tmp_path / "wheel-from-sdist", sdist])
    (wheel,) = (tmp_path / "wheel-from-sdist").glob("eqzoo-*.whl")
    assert _card_from_install(wheel, tmp_path, "sdist") == "SAME"
