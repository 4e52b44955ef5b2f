"""The benchmark script's accelerator run, smoke-tested on the CPU so that it works when a GPU is lent."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_device_bench_runs_on_cpu():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "device", "--device", "cpu",
                          "--batch", "2", "--size", "32", "--repeats", "1"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if line.startswith("| pe_") or line.startswith("| timm")]
    assert len(rows) == 7, out
    assert rows[-1].startswith("| timm resnet18 |") and "| 1.00x |" in rows[-1]
    for row in rows:  # a throughput cell is a number; its size depends on the machine's load, so is not checked
        train_ips = float(row.split("|")[2])
        assert math.isfinite(train_ips) and train_ips >= 0, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_device_bench_without_cuda_says_so():
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "device"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no CUDA device" in res.stderr


def test_large_model_rows_build_and_run(capsys):
    """Every row of ``bench.py models --large`` builds and runs (here at 32x32, batch 2)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    small = {name: dict(spec, size=32) for name, spec in bench.LARGE_FAMILIES.items()}
    bench.bench_models(batch=2, builds=False, families=small, repeats=1)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| pe_") or line.startswith("| timm")]
    assert len(rows) == sum(len(spec["rows"]) for spec in small.values()), out
    for spec in small.values():
        assert any(r.startswith(f"| {spec['rows'][-1][0]} |") and "| 1.00x |" in r for r in rows)


def test_synthesis_breakdown_runs(capsys):
    """``bench.py synthesis`` builds its fixed-filter twin (same outputs as the model, no PEConv2d
    left) and times every column (here at 32x32, batch 2)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    import timm

    import eqzoo  # noqa: F401
    from eqzoo.nn import PEConv2d

    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=10).eval()
    fixed = timm.create_model("pe_resnet18", num_classes=10).eval()
    fixed.load_state_dict(model.state_dict())
    bench._replaced(fixed, PEConv2d, lambda conv: conv.export())
    assert not any(isinstance(m, PEConv2d) for m in fixed.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(fixed(x), model(x), atol=1e-5)
    bench.bench_synthesis(batch=2, size=32, repeats=1, rows=bench.SYNTHESIS_ROWS[:1])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| pe_")]
    assert len(rows) == 1 and all(float(v) > 0 for v in rows[0].strip(" |").split("|")[1:]), rows


def test_compiled_rows_run(capsys):
    """``bench.py compiled`` times every model eager and compiled (here with the aot_eager backend,
    at 32x32, batch 2: the rows, not the speed)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    bench.bench_compiled(batch=2, size=32, repeats=1, rows=bench.COMPILED_ROWS[:1], backend="aot_eager")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| timm", "| pe_"))]
    assert [r.split(" | ")[0] for r in rows] == ["| timm resnet18", "| pe_resnet18 D4"], rows
    assert rows[0].split(" | ")[3:5] == ["1.00x", "1.00x"], rows
