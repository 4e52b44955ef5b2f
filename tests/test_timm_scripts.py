"""timm's scripts with eqzoo's models: ``python -m eqzoo.timm_script SCRIPT ARGS``.

The runner itself is checked on a stand-in script that does what timm's scripts do with a model
(parse ``--model`` / ``--model-kwargs`` with timm's own argparse action, then create_model).
timm's real ``train.py`` then trains a tiny pe model for one epoch on a tiny ImageFolder and
``validate.py`` evaluates its checkpoint, where a folder with timm's scripts is available (they are
in timm's git repository, in neither its wheel nor its sdist: see timm_sources.py).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from eqzoo import timm_script
from timm_sources import SCRIPTS_ENV, subprocess_env, timm_scripts

STAND_IN = '''
import argparse, sys
from timm.models import create_model
from timm.utils import ParseKwargs
import helper  # a module beside the script: the script's folder must be first on sys.path

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
args = parser.parse_args()
if __name__ == "__main__":
    model = create_model(args.model, num_classes=3, **args.model_kwargs)
    print(helper.WORD, sys.argv[0].endswith("stand_in.py"), type(model).__name__, model.group.spec)
'''


def _run(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "eqzoo.timm_script", *map(str, args)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def test_runner_registers_eqzoo_first(tmp_path):
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "stand_in.py").write_text(STAND_IN)
    (tmp_path / "scripts" / "helper.py").write_text("WORD = 'beside'\n")
    res = _run([tmp_path / "scripts" / "stand_in.py", "--model", "pe_resnet18", "--model-kwargs", "group=O2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["beside", "True", "PEResNet", "O2"]


def test_runner_errors(tmp_path, capsys):
    res = _run([tmp_path / "missing.py"], tmp_path)
    assert res.returncode != 0 and "missing.py is not a file" in res.stderr and "usage:" in res.stderr
    with pytest.raises(SystemExit) as exit_:
        timm_script.main([])
    assert exit_.value.code == 2 and "usage: python -m eqzoo.timm_script SCRIPT" in capsys.readouterr().out


SYNC_BN_STAND_IN = '''
import os, sys
import timm, torch
import torch.distributed as dist
from eqzoo.nn import SyncFieldBatchNorm2d

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)  # as train.py does under torchrun
model = timm.create_model("pe_resnet18", num_classes=3, layers=[1, 1, 1, 1], stem_width=8, channels=[8, 8, 8, 8])
model(torch.randn(2, 3, 16, 16)).sum().backward()
synced = sum(isinstance(m, SyncFieldBatchNorm2d) for m in model.modules())
print(synced, sum("BatchNorm" in type(m).__name__ for m in model.modules()))
dist.destroy_process_group()
'''


def test_sync_bn_converts_field_batch_norms(tmp_path):
    import socket

    (tmp_path / "stand_in.py").write_text(SYNC_BN_STAND_IN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = _run([tmp_path / "stand_in.py", port, "--sync-bn"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    synced, norms = map(int, res.stdout.split()[-2:])
    assert synced == norms == 12, res.stdout  # the stem's, the blocks' and the downsampling paths' norms


def _image_folder(root):
    """Two classes (a red and a blue square), four 32x32 images each, in train/ and validation/."""
    for split in ("train", "validation"):
        for name, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (32, 32), color=tuple(max(0, c - 10 * i) for c in color)).save(folder / f"{i}.png")
    return root


def test_timm_train_and_validate(tmp_path):
    scripts = timm_scripts()
    if scripts is None:
        pytest.skip(f"timm's train.py and validate.py are only in timm's git repository: set ${SCRIPTS_ENV} to a "
                    "folder holding them (e.g. a checkout of the installed timm's tag) to run this test")
    data = _image_folder(tmp_path / "data")
    common = ["--model", "pe_resnet18", "--model-kwargs", "group=C4", "--num-classes", "2", "--img-size", "32",
              "--device", "cpu", "--workers", "0"]
    res = _run([scripts / "train.py", "--data-dir", data, *common, "-b", "4", "--epochs", "1", "--opt", "sgd",
                "--lr", "0.01", "--warmup-epochs", "0", "--no-aug", "--output", tmp_path / "out",
                "--experiment", "pe", "--checkpoint-hist", "1", "--log-interval", "1"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "out" / "pe"
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0] and float(rows[0]["train_loss"]) > 0
    checkpoint = run / "model_best.pth.tar"
    assert checkpoint.is_file()

    results = tmp_path / "results.json"
    res = _run([scripts / "validate.py", "--data-dir", data, *common, "-b", "4", "--checkpoint", checkpoint,
                "--results-file", results, "--results-format", "json"], tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(results.read_text())
    out = out[0] if isinstance(out, list) else out
    assert out["model"] == "pe_resnet18" and 0 <= out["top1"] <= 100
    # what validate.py measured is what train.py's last evaluation of the same weights gave
    assert float(out["top1"]) == pytest.approx(float(rows[0]["eval_top1"]), abs=1e-3)
