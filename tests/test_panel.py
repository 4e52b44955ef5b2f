"""scripts/panel.py: every run of the symmetry panel is a valid training config, and the report
reads finished runs."""
import importlib.util
import json
from pathlib import Path

import pytest

from eqzoo.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def panel():
    spec = importlib.util.spec_from_file_location("panel", ROOT / "scripts" / "panel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_panel_run_is_a_valid_config(panel, tmp_path):
    runs = list(panel.all_runs())
    assert len(runs) == len(set(runs))
    assert {d for d, _, _ in runs} == set(panel.DATA) and {m for _, m, _ in runs} == set(panel.MODELS)
    for data, model, seed in runs:
        cfg = load_config(panel.run_config(data, model, seed, "data", tmp_path))
        assert cfg["seed"] == seed and cfg["output"].endswith(f"{data}/{model}/seed{seed}")
    # the widths give every layer at least 8 regular D4 fields
    assert min([panel.ARCH["stem_width"]] + panel.ARCH["channels"]) >= 8 * 8


def test_report_tables_finished_runs(panel, tmp_path):
    for seed, acc in ((0, 0.9), (1, 0.8)):
        run = tmp_path / "c4" / "cnn" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({"test_acc": acc, "best_epoch": 3}))
        (run / "metrics.json").write_text(json.dumps([{"val_acc": 0.5}, {"val_acc": acc}]))
    panel.main(["report", "--out", str(tmp_path), "--mode-gap", ""])
    table = (tmp_path / "panel.md").read_text()
    assert "| c4 | cnn | 2 | 0.850 ± 0.071 | 0.900 / 0.800 | 3 / 3 |" in table
    assert (tmp_path / "curves.png").stat().st_size > 0
