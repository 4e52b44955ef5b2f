"""DDP: ``torchrun --nproc_per_node=2 -m eqzoo.train`` with gloo on CPU trains a learnt-λ model and
ends where one process with the same global batch ends.

What matches, and why: both runs see the same images per global step (DistributedSampler with the
same seed; ``data.batch_size`` is the global batch), DDP averages the per-process gradients of the
mean loss (= the gradient of the global mean), and the regularisers are added identically on every
process. The engine test uses ``freeze_bn: true`` (norm layers in eval mode) and SGD (linear in
the gradient, so float reduction-order noise stays at that level; Adam divides by sqrt(v) and can
magnify noise in near-zero gradients); the synchronised field batch norm that ``eqzoo train``
uses under DDP is compared with one process on the concatenated batch on its own.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from eqzoo.train import train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out):
    cfg = yaml.safe_load((ROOT / "configs" / "digits_c4.yaml").read_text())
    cfg.update(output=str(out), tensorboard=False, progress=False, freeze_bn=True, save_model=False)
    cfg["data"].update(train_size=128, val_size=30, test_size=33, batch_size=32)
    cfg["optim"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
    cfg["schedule"] = {"epochs": 2, "warmup_epochs": 0.5}
    return cfg


def test_two_process_gloo_matches_one_process(tmp_path):
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(tmp_path / "ddp")))
    # PYTHONPATH: the processes import this checkout, whatever the installed copy is
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "eqzoo.train", "--config", str(cfg_file)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(_cfg(tmp_path / "single"))
    finally:
        torch.set_num_threads(n)

    ddp_hist = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(ddp_hist) == 2 and single["status"] == "finished"
    for a, b in zip(ddp_hist, single["history"]):
        assert a["step"] == b["step"] == 4 * a["epoch"]  # 128 images / global batch 32
        for k in ("train_loss", "train_ce", "train_acc", "val_loss", "val_acc", "lambda_kl", "reg_kl_chain"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-5), k
    # metrics are summed over processes: every validation image counted once (30 over 2 processes)
    res = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert res["test_n"] == 33
    wa = load_file(str(tmp_path / "ddp" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    wb = load_file(str(tmp_path / "single" / "checkpoints" / "epoch-0002" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), rtol=1e-3, atol=1e-5), k
    # the checkpoint holds both processes' RNG states (for an exact DDP resume), written once by rank 0
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "epoch-0002" / "state.json").read_text())
    assert len(state["rng"]) == 2


SYNC_BN_SCRIPT = r"""
import os
import sys

import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import eqzoo
from eqzoo.nn import SyncFieldBatchNorm2d, convert_sync_batchnorm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out = {}
for group in ("D4", "O2"):  # permutation fields, and general (band-limited) fields
    torch.manual_seed(0)
    model = convert_sync_batchnorm(timm.create_model("pe_resnet18", group=group, **eval(sys.argv[2])))
    assert any(isinstance(m, SyncFieldBatchNorm2d) for m in model.modules())
    net = torch.nn.parallel.DistributedDataParallel(model)
    x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    y = net(x.chunk(world)[rank])
    y.square().mean().backward()  # DDP averages: the gradient of the mean over the whole batch
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(ys, y.detach())
    out[group + ".out"] = torch.cat(ys)
    out.update({f"{group}.grad.{k}": p.grad for k, p in model.named_parameters() if p.grad is not None})
    out.update({f"{group}.buffer.{k}": b for k, b in model.named_buffers() if "running" in k})
if rank == 0:
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
dist.barrier()  # neither process tears its connections down while the other still uses them
dist.destroy_process_group()
# gloo's threads can abort the interpreter's own teardown on a loaded machine ("terminate called
# without an active exception", SIGABRT) after all of the work above is done: leave without it
os._exit(0)
"""

SMALL = dict(layers=[1, 1, 1, 1], stem_width=16, channels=[16, 16, 32, 32], num_classes=5)


def test_sync_field_batch_norm_matches_one_process_on_the_whole_batch(tmp_path):
    import timm

    from eqzoo.nn import convert_sync_batchnorm

    script, result = tmp_path / "sync_bn.py", tmp_path / "ddp.safetensors"
    script.write_text(SYNC_BN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(result), repr(SMALL)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = load_file(str(result))
    for group in ("D4", "O2"):
        torch.manual_seed(0)
        # outside a process group the converted layer is the plain one: this is one process
        model = convert_sync_batchnorm(timm.create_model("pe_resnet18", group=group, **SMALL))
        x = torch.randn(8, 3, 24, 24, generator=torch.Generator().manual_seed(1))
        y = model(x)
        y.square().mean().backward()
        assert torch.allclose(ddp[group + ".out"], y.detach(), rtol=1e-4, atol=1e-5), group
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert {k[len(group) + 6:] for k in ddp if k.startswith(group + ".grad.")} == set(grads)
        for k, g in grads.items():
            assert torch.allclose(ddp[f"{group}.grad.{k}"], g, rtol=1e-3, atol=1e-5), (group, k)
        buffers = {k: b for k, b in model.named_buffers() if "running" in k}
        assert buffers and all(torch.allclose(ddp[f"{group}.buffer.{k}"], b, rtol=1e-4, atol=1e-6)
                               for k, b in buffers.items()), group
