"""The training engine on the shipped digits set: a run, its files, exact resume, fine-tuning with
a new head, evaluation, the schedule, and config errors raised before anything is trained."""
import json
import math
from pathlib import Path

import pytest
import timm
import timm.optim
import timm.scheduler
import torch
import yaml
from safetensors.torch import load_file

from eqzoo.config import ConfigError, load_config, parse_overrides
from eqzoo.cli import main
from eqzoo.likelihood import likelihoods
from eqzoo.train import TrainingError, build_optimizer, build_scheduler, evaluate, finetune, train
from eqzoo.train.checkpoint import optimizer_from_files, optimizer_to_files

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "digits_c4.yaml"
SMALL_ARGS = dict(group="D4", layers=[1, 1, 1, 1], stem_width=8, channels=[8, 8, 16, 16])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, **over):
    cfg = yaml.safe_load(TINY.read_text())
    cfg.update(output=str(out), tensorboard=False, progress=False)
    cfg["data"].update(train_size=128, val_size=32, test_size=64)
    for k, v in over.items():
        if isinstance(v, dict):
            cfg.setdefault(k, {}).update(v)
        else:
            cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    return train(tiny(out)), out


def test_run_writes_everything_and_learns(full_run):
    res, out = full_run
    assert res["status"] == "finished" and res["epochs_done"] == 3
    h = res["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    for key in ("train_acc", "val_acc", "val_top5", "lambda_kl", "reg_kl_uniform", "lr"):
        assert key in h[0]
    assert all(0 <= row["val_acc"] <= row["val_top5"] <= 1 for row in h)  # top-1 and top-5 (timm.utils.accuracy)
    for f in ("config.yaml", "metrics.csv", "metrics.json", "results.json", "best.safetensors",
              "checkpoints/latest.json", "hub/config.json", "hub/model.safetensors", "hub/likelihoods.json"):
        assert (out / f).is_file(), f
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 4
    assert json.loads((out / "metrics.json").read_text()) == h
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["regularizer"] == {"alignment": 5.0, "kl_chain": 3.0, "kl_uniform": 3.0}
    hub_cfg = json.loads((out / "hub" / "config.json").read_text())
    assert hub_cfg["architecture"] == "pe_resnet18" and hub_cfg["num_classes"] == 10
    assert hub_cfg["pretrained_cfg"]["input_size"] == [1, 16, 16]
    # the saved model is the best-on-validation one and evaluates to the recorded test accuracy
    results = json.loads((out / "results.json").read_text())
    assert results["best_epoch"] == res["best_epoch"]
    ev = evaluate(load_config(str(out / "config.yaml")), str(out))
    assert ev["acc"] == pytest.approx(results["test_acc"]) and ev["n"] == 64


def test_resume_reproduces_the_uninterrupted_run(full_run, tmp_path):
    res, full = full_run
    out = tmp_path / "interrupted"
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny(out)))
    assert main(["train", "--config", str(cfg_file), "--stop-after-epoch", "1"]) == 0
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["epoch"] == 1
    assert not (out / "hub").exists()
    with pytest.raises(TrainingError, match="--resume"):
        train(str(cfg_file))  # a fresh start into a run directory is refused
    assert main(["train", "--resume", str(out)]) == 0
    a = load_file(str(full / "checkpoints" / "epoch-0003" / "model.safetensors"))
    b = load_file(str(out / "checkpoints" / "epoch-0003" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = load_file(str(full / "checkpoints" / "epoch-0003" / "optimizer.safetensors"))
    ob = load_file(str(out / "checkpoints" / "epoch-0003" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    ha, hb = (json.loads((p / "metrics.json").read_text()) for p in (full, out))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]
    assert strip(ha) == strip(hb)
    ma = load_file(str(full / "hub" / "model.safetensors"))
    mb = load_file(str(out / "hub" / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.parametrize("optim, schedule", [
    ({"name": "sgd", "momentum": 0.9}, {"name": "step", "decay_epochs": 1, "decay_rate": 0.5}),
    ({"name": "lamb"}, {"name": "multistep", "decay_milestones": [2]}),
    ({"name": "lion", "lr": 1e-4}, {"name": "tanh", "warmup_epochs": 1}),
])
def test_resume_is_exact_with_timm_optimizers_and_schedules(tmp_path, optim, schedule):
    over = dict(data={"train_size": 64, "val_size": 0, "test_size": 16}, optim=optim,
                schedule=dict(schedule, epochs=3), save_model=False)
    train(tiny(tmp_path / "full", **over))
    train(tiny(tmp_path / "stopped", **over), stop_after_epoch=1)
    train(tiny(tmp_path / "stopped", **over), resume=True)
    for name in ("model", "optimizer"):
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "epoch-0003" / f"{name}.safetensors"))
                for run in ("full", "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    lrs = [row["lr"] for row in json.loads((tmp_path / "full" / "metrics.json").read_text())]
    assert len(set(lrs)) > 1  # the schedule moved


def test_resume_refuses_a_changed_config(full_run, tmp_path):
    _, full = full_run
    with pytest.raises(TrainingError, match="optim.lr"):
        train(str(full / "config.yaml"), resume=True, overrides=["optim.lr=0.1"])
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny(tmp_path / "empty"), resume=True)


def test_finetune_swaps_the_head_and_keeps_the_backbone(full_run, tmp_path):
    _, full = full_run
    cfg = tiny(tmp_path / "ft", model="unused", schedule={"epochs": 1, "warmup_epochs": 0},
               data={"classes": [0, 1, 2], "train_size": 64, "val_size": 16, "test_size": 16},
               freeze_likelihood=True)
    cfg.pop("model_args")
    src = load_file(str(full / "hub" / "model.safetensors"))
    from eqzoo.data import data_info
    from eqzoo.train import build_model
    rcfg = load_config(dict(cfg, model=f"local-dir:{full / 'hub'}", pretrained=True))
    model = build_model(rcfg, data_info(rcfg["data"]))
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    sd = model.state_dict()
    backbone = [k for k in src if not k.startswith("fc.")]
    assert all(torch.equal(sd[k], src[k]) for k in backbone)
    lams = [p for n, p in model.named_parameters() if n.endswith("coefficients")]
    assert lams and not any(p.requires_grad for p in lams)  # freeze_likelihood
    res = finetune(cfg, source=str(full))  # a run directory: its hub/ folder
    assert res["status"] == "finished"
    saved = json.loads((tmp_path / "ft" / "hub" / "config.json").read_text())
    assert saved["num_classes"] == 3 and saved["architecture"] == "pe_resnet18"
    new = load_file(str(tmp_path / "ft" / "hub" / "model.safetensors"))
    lam_keys = [k for k in src if k.endswith("coefficients") and not k.startswith("fc.")]
    assert lam_keys and all(torch.equal(new[k], src[k]) for k in lam_keys)  # λ stayed frozen


def test_plain_cnn_baseline_and_eval_cli(tmp_path):
    cfg = tiny(tmp_path / "cnn", model="resnet18", schedule={"epochs": 1, "warmup_epochs": 0},
               optim={"name": "sgd", "lr": 0.05})
    del cfg["model_args"]["group"]  # same widths as the pe model, no group
    res = train(cfg)
    assert res["status"] == "finished"
    import timm
    m = timm.create_model(f"local-dir:{tmp_path / 'cnn' / 'hub'}", pretrained=True)
    assert m.num_classes == 10 and m.conv1.in_channels == 1
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "cnn"), "--split", "val", "--output", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["split"] == "val" and ev["n"] == 32
    assert ev["acc"] == pytest.approx(res["history"][-1]["val_acc"])


def test_timm_schedule_is_stepped_per_update_with_the_likelihood_scale():
    cfg = load_config(TINY, ["optim.lr=1.0", "optim.likelihood_lr_scale=10", "schedule.epochs=10",
                             "schedule.warmup_epochs=1", "schedule.min_lr=0.1"])
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=3, **SMALL_ARGS)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, 10)  # 10 updates per epoch
    assert isinstance(opt, torch.optim.AdamW) and isinstance(sched, timm.scheduler.CosineLRScheduler)
    lam = [g["lr_scale"] for g in opt.param_groups].index(10.0)

    def lrs(step):
        sched.step_update(step)
        return [g["lr"] / g["lr_scale"] for g in opt.param_groups], opt.param_groups[lam]["lr"]

    assert lrs(5) == (pytest.approx([0.5] * 3), pytest.approx(5.0))  # linear warm-up from 0
    cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * 0.55))
    assert lrs(55) == (pytest.approx([cosine] * 3), pytest.approx(10 * cosine))
    assert lrs(100) == (pytest.approx([0.1] * 3), pytest.approx(1.0))


def test_every_timm_optimizer_or_a_clear_error(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("pe_resnet18", num_classes=3, **SMALL_ARGS)
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # one set of gradients for every optimizer's step
    built, cfg = [], load_config(TINY)
    for name in timm.optim.list_optimizers():
        cfg["optim"]["name"] = name
        try:
            opt = build_optimizer(cfg, model)
        except ConfigError as e:  # second-order, or a package (bitsandbytes, apex) that is not installed
            assert "second-order" in str(e) or "needs CUDA and" in str(e), (name, e)
            continue
        assert [len(g["params"]) for g in opt.param_groups][-1] == len(list(likelihoods(model).values())), name
        if not name.startswith("kron"):  # kron's first step takes seconds (it sets up its preconditioners)
            opt.step()
        # a checkpoint holds the whole state (lists of tensors, per-group counts, dtypes) and restores it
        tensors, meta = optimizer_to_files(opt)
        again = build_optimizer(cfg, model)
        optimizer_from_files(again, dict(tensors), json.loads(json.dumps(meta)))
        t2, meta2 = optimizer_to_files(again)
        assert meta2 == meta and all(torch.equal(tensors[k], t2[k]) for k in tensors), name
        built.append(name)
    assert {"adamw", "sgd", "lamb", "lion", "adan", "rmsproptf"} <= set(built)
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adamww' \(did you mean 'adamw'\?\)"):
        build_optimizer(load_config(TINY, ["optim.name=adamww"]), model)


def test_overrides():
    assert parse_overrides(["optim.lr=1e-3", "data.symmetry=[C1,SO2]", "model_args.group=O2"]) == {
        "optim": {"lr": 1e-3}, "data": {"symmetry": ["C1", "SO2"]}, "model_args": {"group": "O2"}}
    cfg = load_config(TINY, ["model_args.group=C4", "schedule.epochs=7"])
    assert cfg["model_args"]["group"] == "C4" and cfg["model_args"]["layers"] == [1, 1, 1, 1]
    assert cfg["schedule"]["epochs"] == 7 and cfg["output"].endswith("digits_c4")


@pytest.mark.parametrize("over, match", [
    ({"optimizer": {"lr": 1}}, r"unknown config key 'optimizer' \(did you mean 'optim'\?\)"),
    ({"optim": {"learning_rate": 1}}, r"unknown config key 'optim.learning_rate'.*accepted keys in optim: .*lr"),
    ({"optim": {"lr": "fast"}}, r"'optim.lr' must be an int or a number, got 'fast'"),
    ({"optim": {"name": "lamm"}}, r"'optim.name': unknown optimizer 'lamm' \(did you mean 'lamb'\?\)"),
    ({"schedule": {"epochs": True}}, r"'schedule.epochs' must be an int, got True"),
    ({"schedule": {"epochs": 0}}, r"'schedule.epochs' must be >= 1"),
    ({"data": {"name": "imagenet"}}, r"'data.name' must be one of digits, mnist"),
    ({"data": {"symmetry": "SO3"}}, r"unknown group 'SO3'"),
    ({"device": "tpu"}, r"'device' must be auto, cpu, cuda or cuda:N"),
    ({"model_args": {"num_classes": 5}}, r"model_args.num_classes' is set from the data set"),
])
def test_bad_configs_fail_before_training(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny(tmp_path / "bad", **over))
    assert not (tmp_path / "bad").exists()


def test_bad_runtime_configs_fail_before_training(tmp_path):
    from eqzoo.data import DataNotFoundError

    with pytest.raises(DataNotFoundError, match="download=True"):
        train(tiny(tmp_path / "bad", data={"name": "ddmnist", "root": str(tmp_path / "nowhere"),
                                                         "symmetry": ["C1", "SO2"], "train_size": 100,
                                                         "val_size": 100, "test_size": 100}))
    with pytest.raises(ConfigError, match="unknown model 'pe_resnet999'"):
        train(tiny(tmp_path / "bad", model="pe_resnet999"))
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_example_configs_for_your_own_images(full_run, tmp_path, capsys):
    from test_data import _image_folder

    root = _image_folder(tmp_path / "images", "L")
    base = ["progress=false", "tensorboard=false", "schedule.epochs=1", "schedule.warmup_epochs=0",
            f"data.root={root}", "data.batch_size=4"]
    cfg = load_config(ROOT / "configs" / "imagefolder.yaml", base)
    assert cfg["model"] == "pe_resnet18" and cfg["data"]["hflip"] == 0.0
    # fine-tuning from a saved run: the config names no model, the model comes from --from
    _, run = full_run
    assert "model" not in yaml.safe_load((ROOT / "configs" / "finetune_imagefolder.yaml").read_text())
    assert main(["finetune", "--config", str(ROOT / "configs" / "finetune_imagefolder.yaml"), "--from", str(run),
                 *base, f"output={tmp_path / 'ft'}"]) == 0
    recorded = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert recorded["model"] == f"local-dir:{run / 'hub'}" and recorded["data"]["name"] == "imagefolder"
    saved = json.loads((tmp_path / "ft" / "hub" / "config.json").read_text())
    # the source reads one channel: so are the grayscale images
    assert saved["num_classes"] == 2 and saved["pretrained_cfg"]["input_size"] == [1, 12, 12]
    # the class names (the folder names) are saved as timm saves them, and eval prints them
    assert saved["label_names"] == ["cat", "dog"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ft"), "--split", "val"]) == 0
    assert json.loads(capsys.readouterr().out)["label_names"] == ["cat", "dog"]
    for split in ("train", "val"):  # other classes, as many: refused
        (root / split / "dog").rename(root / split / "bird")
    assert main(["eval", str(tmp_path / "ft"), "--split", "val"]) == 2
    assert "other names" in capsys.readouterr().err


def test_messages_go_through_logging_and_bars_need_a_terminal(tmp_path, capsys, monkeypatch):
    import logging
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if TensorBoard were not installed
    small = {"train_size": 64, "val_size": 16, "test_size": 16}
    train(tiny(tmp_path / "run", progress=True, tensorboard=True, data=small, schedule={"epochs": 2}))
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # not a terminal: no progress bar
    assert out.count("TensorBoard is not installed") == 1 and not (tmp_path / "run" / "tb").exists()
    assert "batch 32 in all (data.batch_size), 32 per process" in out  # the global and the per-process batch
    train(tiny(tmp_path / "quiet", tensorboard=None, data=small, schedule={"epochs": 1}))  # the default
    assert "TensorBoard" not in capsys.readouterr().out  # TensorBoard where it is installed, and no warning
    records, logger = [], logging.getLogger("eqzoo.train")
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(logger, "handlers", [handler])  # an application's own handler replaces the console
    train(tiny(tmp_path / "run2", data=small, schedule={"epochs": 1}))
    assert any(r.getMessage().startswith("results: ") for r in records) and capsys.readouterr().out == ""


def test_cli_answers_help_and_config_errors_before_importing_torch():
    code = """
import sys
from eqzoo.cli import main
for argv in (["--help"], ["train", "--help"], ["inspect", "x", "--equivariance", "0"]):
    try:
        main(argv)
    except SystemExit:
        pass
assert main(["train", "--config", "configs/digits_c4.yaml", "optim.lrr=1"]) == 2  # a typo in a key
print(sorted({"torch", "timm", "escnn"} & set(sys.modules)))
import timm  # imported after eqzoo: the models are registered once timm is
print(timm.is_model("pe_resnet18"))
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and lines[-2:] == ["[]", "True"], out.stdout[-2000:] + out.stderr[-2000:]
    assert "usage: eqzoo train" in out.stdout and "SIZE must be an integer in [8, 512]" in out.stderr
    assert "unknown config key 'optim.lrr' (did you mean 'lr'?)" in out.stderr
