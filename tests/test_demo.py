"""`make demo`, the first thing a user runs, must also work the second time: training, the Hub
format, and the release path (build, publish to a local Hub, load by tag, fine-tune)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_twice_in_a_row(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(tmp_path), "--epochs", "1"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    stamp = (tmp_path / "digits_d4_learnt" / "results.json").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "replacing the previous demo run" in second.stdout
    assert (tmp_path / "digits_d4_learnt" / "results.json").stat().st_mtime_ns != stamp
    assert "| learnt λ over D4 |" in second.stdout and "demo done" in second.stdout
    assert (tmp_path / "likelihoods.png").stat().st_size > 0
    # the release path: a tag published to the local Hub, loaded online and offline, fine-tuned
    assert "replacing the previous demo release" in second.stdout
    assert second.stdout.count("timm.create_model('pe_resnet18.d4_digits', pretrained=True)") == 2
    assert "timm.list_pretrained('pe_*'): ['pe_resnet18.d4_digits', 'pe_resnet18.d4_strict_digits']" in second.stdout
    row = next(line for line in second.stdout.splitlines() if line.startswith("| digits | 10 |"))
    assert row.count("(1)") == 7
