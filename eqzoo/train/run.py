"""A training run from start to finish: set-up, epochs, and the end (test, results, saved model).

Exact resume: the learning rate is a pure function of the step, the data order of epoch e is a
function of (seed, e) (DistributedSampler.set_epoch, also with one process), and the RNG states are
restored at the epoch boundary. A run stopped after epoch k and resumed ends with the same weights
as an uninterrupted run.

DDP: ``torchrun --nproc_per_node=N -m eqzoo.train --config C`` (gloo on CPU, NCCL on GPU).
``data.batch_size`` is the global batch: each process takes batch_size / N, so a config gives the
same optimisation on any number of processes. Metrics are summed over processes; rank 0 alone
writes files.
"""
from __future__ import annotations

import json
import logging
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._io import atomic_write, save_tensors, write_json
from ..config import RESUME_SAFE, config_diff, dump_config, validate_config
from ..data import build_datasets, data_info
from ..errors import CheckpointError, TrainingError
from ..nn import convert_sync_batchnorm
from ..sources import HUB_DIR
from . import loop
from .checkpoint import RunDir, finite_tensors, load_checkpoint, rng_state, set_rng_state
from .dist import Dist, console_logging, init_dist, log, run_device
from .model import build_model, build_optimizer, build_scheduler, check_optimizer, lambda_kl, mixed_precision
from .output import record_input, save_model_dir


@dataclass
class Run:
    """Everything one training process holds during a run."""

    cfg: dict
    d: Dist
    device: torch.device
    folder: RunDir
    model: nn.Module
    net: nn.Module  # what the batches go through: the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    autocast: Callable
    scaler: Any
    splits: Any
    train_loader: Any
    sampler: Any
    val_loader: Any
    test_loader: Any
    channels_last: bool
    sched: Any  # timm scheduler, stepped per update
    state: dict
    writer: Any = None


# -- set-up -------------------------------------------------------------------------------------------
def _check_resume_config(cfg: dict, folder: RunDir) -> None:
    """A resumed run computes what its checkpoint began: the config is compared with the one the
    checkpoint pinned (its state.json), not with config.yaml, which anyone may have edited since."""
    latest, _ = folder.resume_point()
    pinned = json.loads((latest / "state.json").read_text(encoding="utf-8")).get("config")
    if not isinstance(pinned, dict):
        raise TrainingError(f"cannot resume {folder.path}: {latest / 'state.json'} has no pinned config")
    changed = [k for k in config_diff(pinned, cfg) if k not in RESUME_SAFE]
    if changed:
        raise TrainingError(f"cannot resume {folder.path}: the config differs from the one its checkpoint "
                            f"{latest.name} was trained with in {', '.join(changed)} (config.yaml edited, or "
                            f"overrides given); only {', '.join(sorted(RESUME_SAFE))} may change when resuming")


def _check_folder(cfg: dict, folder: RunDir, resume: bool, overwrite: bool) -> None:
    """Read-only checks first, so that a mistake costs no build (the claim repeats them)."""
    folder.check_is_folder()
    if resume and not folder.has_checkpoint():
        raise TrainingError(f"nothing to resume in {folder.path}: no checkpoint (checkpoints/latest.json)"
                            + ("; start the run again with --overwrite" if folder.holds_run() else ""))
    if not resume and not overwrite and folder.holds_run():
        raise TrainingError(folder.holds_message(folder.holds_run()))
    if resume:
        _check_resume_config(cfg, folder)


def _claim(folder: RunDir, resume: bool, overwrite: bool, d: Dist, stack: ExitStack) -> None:
    """Rank 0 claims the run folder (see :meth:`RunDir.claimed`) for the rest of the run; every
    process learns whether it could."""
    error = None
    if d.main:
        try:
            stack.enter_context(folder.claimed(resume, overwrite))
        except TrainingError as e:
            error = str(e)
    if d.on:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainingError(error)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _restore(r: Run) -> None:
    """Continue from the run's last usable checkpoint: weights, optimiser, scaler, state, RNGs. A
    checkpoint that cannot be applied (non-finite tensors, damaged state.json) is named, and the
    previous one is used."""
    latest, problems = r.folder.resume_point()
    older = [p for p in r.folder.checkpoints() if int(p.name[6:]) < int(latest.name[6:])]
    for folder in [latest] + older:
        problem = r.folder.check_checkpoint(folder)
        if problem is not None:
            problems.append(problem)
            continue
        try:
            saved = load_checkpoint(folder, r.model, r.opt, r.scaler, r.state, len(r.train_loader))
            break
        except CheckpointError as e:
            problems.append(str(e))
    else:
        raise TrainingError(f"nothing to resume in {r.folder.path}: no usable checkpoint ({'; '.join(problems)}); "
                            "start the run again with --overwrite")
    for problem in problems:  # a damaged newer checkpoint: say so, and which one is used
        log(r.d, f"warning: {problem}; resuming from {folder.name} instead", logging.WARNING)
    log(r.d, f"resuming {r.folder.path} from {folder.name}")
    r.folder.previous = folder
    if len(saved["rng"]) == r.d.world:
        set_rng_state(saved["rng"][r.d.rank])
    else:
        log(r.d, f"warning: checkpoint from {len(saved['rng'])} processes, now {r.d.world}: RNG streams restart",
            logging.WARNING)
        torch.manual_seed(r.cfg["seed"] + 1000 * r.state["epoch"] + r.d.rank)


def _tensorboard(cfg: dict, folder: RunDir, d: Dist):
    if not (d.main and cfg["tensorboard"] is not False):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: CSV and JSON are always written
    except ImportError:
        if not cfg["tensorboard"]:  # null: TensorBoard only where it is installed, no warning
            return None
        log(d, "warning: tensorboard: true, but TensorBoard is not installed (pip install tensorboard): metrics go "
               "to metrics.csv and metrics.json only", logging.WARNING)
        return None
    return SummaryWriter(str(folder.path / "tb"))


def _model_in_chans(cfg: dict) -> int | None:
    """The input channels the model takes: ``model_args.in_chans``; when fine-tuning a saved model on
    an ImageFolder (read with either count), its config.json's; None: the data's own (timm adapts a
    pretrained stem to it)."""
    if "in_chans" in cfg["model_args"] or not (cfg["pretrained"] and ":" in cfg["model"]
                                               and cfg["data"]["name"] == "imagefolder"):
        return cfg["model_args"].get("in_chans")
    from ..models._schema import load_config_file
    from ..sources import fetch, parse_source

    saved = load_config_file(fetch(*parse_source(cfg["model"]), "config.json"))
    size = (saved.get("pretrained_cfg") or {}).get("input_size")
    chans = (saved.get("model_args") or {}).get("in_chans", size[0] if isinstance(size, list) and size else None)
    return chans if isinstance(chans, int) and not isinstance(chans, bool) else None


def _start(cfg: dict, folder: RunDir, resume: bool, overwrite: bool, d: Dist, stack: ExitStack) -> Run:
    """Build everything a run needs (data files and folder checked before anything is built)."""
    device = run_device(cfg, d)
    check_optimizer(cfg["optim"]["name"])
    _check_folder(cfg, folder, resume, overwrite)
    info = data_info(cfg["data"], _model_in_chans(cfg))  # missing files, or channels that do not fit: before any build
    _seed(cfg["seed"])  # same initial weights on every process
    model = build_model(cfg, info, pretrained=cfg["pretrained"] and not resume)
    splits = build_datasets(cfg["data"], model, info["in_chans"])
    if splits.num_classes != info["num_classes"]:
        raise TrainingError(f"data set has {splits.num_classes} classes, expected {info['num_classes']}")
    _claim(folder, resume, overwrite, d, stack)
    if d.main and not resume:  # at once: the folder now holds this run
        atomic_write(folder.path / "config.yaml", lambda p: p.write_text(dump_config(cfg), encoding="utf-8"))
    if d.on:  # every process normalises with the statistics of the global batch, as one process would
        model = convert_sync_batchnorm(model)
    channels_last = cfg["channels_last"] and device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    autocast, scaler = mixed_precision(cfg, device)
    train_loader, sampler, val_loader, test_loader = loop.make_loaders(cfg, splits, d, device)
    steps = len(train_loader)
    opt = build_optimizer(cfg, model)
    r = Run(cfg, d, device, folder, model, model, opt, autocast, scaler, splits, train_loader, sampler, val_loader,
            test_loader, channels_last, build_scheduler(cfg, opt, steps),
            {"epoch": 0, "step": 0, "best_epoch": None, "best_val_acc": None, "history": []})
    if resume:
        _restore(r)
    else:  # after the identical init: give each process its own stream (dropout, augmentation)
        torch.manual_seed(cfg["seed"] * 7919 + d.rank)
    if d.on:
        r.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    r.writer = _tensorboard(cfg, folder, d)
    log(d, f"{cfg['model']} on {cfg['data']['name']}: {sum(p.numel() for p in model.parameters()):,} parameters, "
           f"{len(splits.train)} training images, {steps} steps/epoch, {d.world} process(es), {device}; batch "
           f"{cfg['data']['batch_size']} in all (data.batch_size), {cfg['data']['batch_size'] // d.world} per process")
    return r


# -- epochs and the end --------------------------------------------------------------------------------
def _end_epoch(r: Run, epoch: int, row: dict, t0: float) -> None:
    """Validate, keep the best weights, write the checkpoint and the metrics of ``epoch``."""
    state = r.state
    if r.val_loader is not None:
        v = loop.evaluate_loader(r.net, r.val_loader, r.device, r.autocast, r.d, r.channels_last)
        row.update(val_loss=v["loss"], val_acc=v["acc"], val_top5=v["top5"])
        if state["best_val_acc"] is None or v["acc"] > state["best_val_acc"]:
            state["best_val_acc"], state["best_epoch"] = v["acc"], epoch + 1
            if r.d.main:
                save_tensors(r.model.state_dict(), r.folder.path / "best.safetensors")
    row["time"] = time.time() - t0
    state["history"].append(row)
    state["epoch"] = epoch + 1
    rng = [rng_state()]
    if r.d.on:
        rng = [None] * r.d.world
        dist.all_gather_object(rng, rng_state())
    if r.d.main:
        r.folder.save_checkpoint(epoch + 1, r.model, r.opt, state, rng, r.scaler, r.cfg)
        r.folder.write_metrics(state["history"])
        if r.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    r.writer.add_scalar(k, v, epoch + 1)
            r.writer.flush()
    log(r.d, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if r.d.on:
        dist.barrier()  # nobody runs ahead of rank 0's checkpoint


def _finish(r: Run) -> tuple[dict, str | None]:
    """Test the best-on-validation weights; write results.json and the Hub-format model."""
    state, epochs = r.state, r.cfg["schedule"]["epochs"]
    if state["best_epoch"] is not None and (r.folder.path / "best.safetensors").is_file():
        r.model.load_state_dict(finite_tensors(r.folder.path / "best.safetensors"))
    results = {"best_epoch": state["best_epoch"] or epochs, "val_acc": state["best_val_acc"]}
    if r.test_loader is not None:
        t = loop.evaluate_loader(r.net, r.test_loader, r.device, r.autocast, r.d, r.channels_last)
        results.update(test_acc=t["acc"], test_top5=t["top5"], test_loss=t["loss"], test_n=t["n"])
    results["lambda_kl"] = lambda_kl(r.model)
    model_dir = None
    record_input(r.model, r.splits, r.cfg)
    if r.d.main:
        write_json(r.folder.path / "results.json", results)
        if r.cfg["save_model"]:
            r.model.to(memory_format=torch.contiguous_format)
            model_dir = str(save_model_dir(r.model, r.folder.path / HUB_DIR, r.cfg, results))
        if r.writer is not None:
            r.writer.close()
        log(r.d, "results: " + json.dumps(results))
    if r.d.on:
        dist.barrier()
    return results, model_dir


def run_training(cfg: dict, resume: bool = False, stop_after_epoch: int | None = None,
                 overwrite: bool = False) -> dict:
    """Train with a config into ``cfg.output`` (see :func:`eqzoo.train.train`)."""
    cfg = validate_config(cfg)
    console_logging()
    d = init_dist(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    stack, folder = ExitStack(), RunDir(cfg["output"])
    try:
        r = _start(cfg, folder, resume, overwrite, d, stack)
        epochs = cfg["schedule"]["epochs"]
        for epoch in range(r.state["epoch"], epochs if stop_after_epoch is None else min(epochs, stop_after_epoch)):
            t0 = time.time()
            _end_epoch(r, epoch, loop.train_epoch(r, epoch), t0)
        result = {"run_dir": str(folder.path), "epochs_done": r.state["epoch"], "epochs": epochs,
                  "best_epoch": r.state["best_epoch"], "best_val_acc": r.state["best_val_acc"],
                  "history": r.state["history"]}
        if r.state["epoch"] < epochs:
            log(d, f"stopped after epoch {r.state['epoch']}/{epochs}; continue with --resume")
            return dict(result, status="stopped")
        results, model_dir = _finish(r)
        return dict(result, status="finished", results=results, model_dir=model_dir)
    except BaseException as e:
        if d.main and folder.held and not folder.has_checkpoint():
            folder.clear_failed_start()  # nothing to resume: the same command may simply be run again
        if isinstance(e, KeyboardInterrupt) and d.main and folder.held:  # Ctrl-C while training: how to go on
            latest = folder.latest()
            hint = (f"resume from {latest.name} with: eqzoo train --resume {folder.path}" if latest is not None else
                    "no epoch was completed and the run's files were removed: run the same command again")
            print(f"\ninterrupted; {hint}", file=sys.stderr)
        raise
    finally:
        stack.close()
        d.close()
