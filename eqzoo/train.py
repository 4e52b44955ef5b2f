"""Training, fine-tuning and evaluation engine (``eqzoo train | finetune | eval``).

One run = one config (see :mod:`eqzoo.config`) and one run directory::

    runs/NAME/
      config.yaml            the resolved config (every key, defaults filled in)
      metrics.csv            one row per epoch (also metrics.json; TensorBoard in tb/ when installed)
      metrics.json
      checkpoints/latest.json -> epoch-NNNN/   the last complete checkpoint (resumable), and the one before
      best.safetensors       the weights of the best validation epoch
      results.json           best epoch, its validation accuracy, test accuracy of those weights
      hub/                   the Hub-format model (eqzoo.save_pretrained): what `eqzoo publish` uploads
      .eqzoo-run.lock        locked by the run writing here: a second run into the folder is refused

Checkpoints hold only safetensors and JSON: model and optimizer tensors in safetensors, the
optimizer's hyper-parameters, epoch, step, best-so-far, history and every process's RNG states in
JSON. Nothing is pickled, so nothing is unpickled on resume. Each is written into a temporary
folder and renamed into place; resuming checks it (complete safetensors, state.json for its epoch)
and falls back to the previous one, saying so, when the latest is damaged.

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

import argparse
import base64
import csv
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ._io import atomic_write, locked, new_sibling_dir, replace_dir, save_tensors, write_json
from .config import (RESUME_SAFE, ConfigError, config_diff, dump_config, load_config, parse_overrides, read_yaml,
                     validate_config)

__all__ = ["train", "finetune", "evaluate", "cmd_train", "cmd_finetune", "cmd_eval", "main", "build_model",
           "SUBCOMMANDS", "configure_train", "run_train", "configure_finetune", "run_finetune", "configure_eval", "run_eval",
           "save_model_dir", "lambda_kl", "TrainingError"]


HUB_DIR = "hub"  # the run directory's Hub-format model folder (eqzoo.cli looks there too)


class TrainingError(RuntimeError):
    """A run cannot start or continue (existing run directory, nothing to resume, ...)."""


# -- processes and devices --------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _init_dist(device_cfg: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(rank, world, local, owned=False)
    cuda = device_cfg != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)  # before NCCL: its collectives run on the current device
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, owned=True)


def _device(cfg: dict, d: Dist) -> torch.device:
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {cfg['device']!r} requested but CUDA is not available; set device=cpu")
        return torch.device("cuda", d.local_rank if d.on else (int(want[5:]) if ":" in want else 0))
    return torch.device("cpu")


def _log(d: Dist, msg: str) -> None:
    if d.main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)


# -- model ----------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    # timm model names never hold a path separator, nor start with a dot or a tilde
    return os.sep in name or "/" in name or name.startswith((".", "~"))


def _source(name: str) -> str:
    """A plain directory becomes ``local-dir:``; a run directory means its ``hub/`` folder. A
    path that does not exist is an error here (it would otherwise be taken for a model name)."""
    if name.startswith("local-dir:") and not Path(name[len("local-dir:"):]).is_dir():
        raise FileNotFoundError(f"{name}: no such folder")
    if ":" not in name and Path(name).is_dir():
        p = Path(name)
        if (p / HUB_DIR / "config.json").is_file():
            p = p / HUB_DIR
        elif not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} has no config.json (nor {HUB_DIR}/config.json): not a run or a model "
                                    "folder (a run's model is written when it finishes)")
        return f"local-dir:{p}"
    if ":" not in name and _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such run or model folder")
    return name


def build_model(cfg: dict, info: dict, pretrained: bool | None = None) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes=<data>, in_chans=<data>, **cfg.model_args)``; with
    ``pretrained`` (fine-tuning) the checkpoint's head is replaced when the class count differs, and
    also when it matches if ``reset_head``. Likelihoods are frozen with ``freeze_likelihood``."""
    import timm

    import eqzoo.models  # noqa: F401  (registers the pe_* models with timm)

    from .validate import ModelArgError

    pretrained = cfg["pretrained"] if pretrained is None else pretrained
    kwargs = dict(cfg["model_args"])
    kwargs["num_classes"] = info["num_classes"]
    kwargs.setdefault("in_chans", info["in_chans"])
    name = _source(cfg["model"])
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"config key 'model': unknown model {cfg['model']!r} ({e}); list them with "
                              "timm.list_models('pe_*') / timm.list_models()") from None
        raise
    except TypeError as e:  # a model_args key the model does not take
        raise ConfigError(f"config key 'model_args' does not fit {cfg['model']!r}: {e}") from None
    except ModelArgError as e:  # a value out of range, or widths that do not fit the group
        key = "model_args" if e.arg == "arguments" else f"model_args.{e.arg}"
        raise ConfigError(f"config key {key!r} {e.problem}") from None
    if pretrained and cfg["reset_head"] and getattr(model, "num_classes", None) == info["num_classes"] \
            and hasattr(model, "reset_classifier"):
        model.reset_classifier(info["num_classes"])  # a fresh head even when the class count is unchanged
    if cfg["freeze_likelihood"]:
        from .regularizers import likelihoods

        for lam in likelihoods(model).values():
            lam.coefficients.requires_grad_(False)
    return model


def lambda_kl(model: nn.Module) -> float:
    """Mean KL(λ ‖ uniform) over the model's distinct likelihoods (0 for a model without any): how
    far from fully equivariant the model has moved."""
    from .regularizers import likelihoods

    lams = list(likelihoods(model).values())
    if not lams:
        return 0.0
    with torch.no_grad():
        return float(sum(float(lam.kl_uniform()) for lam in lams) / len(lams))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or (
        hasattr(m, "running_mean") and hasattr(m, "running_var"))


def _set_train(model: nn.Module, cfg: dict) -> None:
    model.train()
    if cfg["freeze_bn"]:  # running statistics stay as loaded; normalise with them, don't update them
        for m in model.modules():
            if _is_norm(m):
                m.eval()


# -- optimiser and schedule ---------------------------------------------------------------------------
def _param_groups(model: nn.Module, weight_decay: float, likelihood_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on conv/linear weights only. Biases and norm parameters follow the usual
    practice; the likelihood coefficients get a group of their own without decay (decay would pull
    λ's logits to 0, an extra prior beside the regularisers the config weighs) and with their own
    learning-rate scale (``lr_scale``, applied by the schedule)."""
    from .regularizers import likelihoods

    lam_params = {id(lam.coefficients) for lam in likelihoods(model).values()}
    decay, no_decay, lam = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in lam_params:
            lam.append(p)
        else:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
            {"params": lam, "weight_decay": 0.0, "lr_scale": float(likelihood_lr_scale)}]


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    groups = _param_groups(model, o["weight_decay"], o["likelihood_lr_scale"])
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], momentum=o["momentum"], nesterov=o["momentum"] > 0)
    cls = torch.optim.AdamW if o["name"] == "adamw" else torch.optim.Adam
    return cls(groups, lr=o["lr"], betas=tuple(o["betas"]))


def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine from ``base`` to ``min_lr`` at ``total``.
    A pure function of the step: the schedule's whole state is the step counter."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t))


# -- data loading -------------------------------------------------------------------------------------
class _Shard(Sampler):
    """Evaluation sampler: process r takes indices r, r + N, ... (no padding, unlike
    DistributedSampler, so summed metrics count every image exactly once)."""

    def __init__(self, n: int, d: Dist):
        self.idx = list(range(d.rank, n, d.world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def _loaders(cfg: dict, splits, d: Dist, device: torch.device):
    dc = cfg["data"]
    if dc["batch_size"] % d.world:
        raise ConfigError(f"config key 'data.batch_size' ({dc['batch_size']}) is the global batch and must be "
                          f"divisible by the number of processes ({d.world})")
    local = dc["batch_size"] // d.world
    # DistributedSampler also with one process: the data order of epoch e is then a function of
    # (seed, e) alone, which is what makes resume exact and 1-vs-N-process runs comparable
    sampler = DistributedSampler(splits.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg["seed"])
    kw = dict(num_workers=dc["workers"], pin_memory=device.type == "cuda", persistent_workers=False)
    train = DataLoader(splits.train, batch_size=local, sampler=sampler, drop_last=len(sampler) >= local, **kw)
    ebs = max(1, (dc["eval_batch_size"] or 2 * dc["batch_size"]) // d.world)
    mk = lambda ds: DataLoader(ds, batch_size=ebs, sampler=_Shard(len(ds), d), **kw) if ds is not None else None
    return train, sampler, mk(splits.val), mk(splits.test)


# -- steps ----------------------------------------------------------------------------------------------
def _amp(cfg: dict, device: torch.device):
    """(autocast context factory, GradScaler or None). CUDA only; bf16 where the GPU has it (no
    loss scaling needed), else fp16 with a GradScaler."""
    if not (cfg["amp"] and device.type == "cuda"):
        return nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _all_sum(values: list[float], d: Dist, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if d.on:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def _evaluate_loader(model, loader, device, autocast, d: Dist, channels_last: bool = False) -> dict:
    model.eval()
    loss_sum, correct, n = 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += float((logits.argmax(-1) == y).sum())
        n += len(y)
    loss_sum, correct, n = _all_sum([loss_sum, correct, n], d, device)
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}


# -- checkpoints ------------------------------------------------------------------------------------------
def _load_tensors(path: Path) -> dict:
    """A safetensors file, checked to be complete first (a damaged file names itself)."""
    from safetensors.torch import load_file

    from .hub import check_safetensors

    check_safetensors(path)
    return load_file(str(path))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def _rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(_unb64(s["torch"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(c) for c in s["cuda"]][:torch.cuda.device_count()])
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as (tensors for safetensors, JSON): per-parameter tensors by "pid.name",
    hyper-parameters (param_groups) and non-tensor per-parameter values in the JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


_CHECKPOINT = re.compile(r"epoch-(\d{4,})")
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_STATE_KEYS = ("epoch", "step", "best_epoch", "best_val_acc", "history", "optimizer", "rng")


class RunDir:
    """The files of one run (see the module docstring)."""

    # what makes a folder hold a run (a fresh start into it is refused without --overwrite)
    RUN_FILES = ("config.yaml", "checkpoints", "metrics.csv", "metrics.json", "best.safetensors",
                 "results.json", HUB_DIR, "tb")
    LOCK = ".eqzoo-run.lock"  # flock'ed by the run writing here (the kernel drops it if the run dies)

    def __init__(self, path):
        self.path = Path(path)
        self.ckpts = self.path / "checkpoints"
        self.previous: Path | None = None  # the checkpoint this process last saved or resumed from

    def holds_run(self) -> list[str]:
        """The run files in the folder (empty: no run)."""
        return [name for name in self.RUN_FILES if (self.path / name).exists()]

    def clear(self) -> None:
        """Remove a previous run's files (``--overwrite``)."""
        for name in self.RUN_FILES:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    @contextmanager
    def claimed(self, resume: bool, overwrite: bool):
        """Hold the run folder for a run: refuses a folder another run is writing to right now,
        and (unless resuming) one that holds a run, except with ``overwrite``. The check and the
        claim are one step under the lock, so of two runs started at once one is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        with locked(self.path / self.LOCK, blocking=False) as got:
            if not got:
                raise TrainingError(f"another eqzoo run is writing to {self.path} right now; wait for it to "
                                    "finish, or set output=<another folder>")
            if not resume:
                held = self.holds_run()
                if held and not overwrite:
                    raise TrainingError(self._holds_message(held))
                if held:
                    self.clear()
            yield

    def _holds_message(self, held: list[str]) -> str:
        what = "a checkpoint" if "checkpoints" in held else "files of a run: " + ", ".join(held)
        return (f"{self.path} already holds a run ({what}): pass --resume to continue it, --overwrite to start "
                "it again (its files are deleted), or set output=<another folder>")

    def _pointed(self) -> tuple[Path | None, str | None]:
        """The checkpoint latest.json names, or (None, why not)."""
        ptr = self.ckpts / "latest.json"
        if not ptr.is_file():
            return None, None
        try:
            name = json.loads(ptr.read_text(encoding="utf-8"))["dir"]
        except (ValueError, KeyError, TypeError) as e:
            return None, f"{ptr} is not valid ({type(e).__name__}: {e})"
        # a bare folder name of this run only: a path into another run would mix two runs
        if not isinstance(name, str) or not _CHECKPOINT.fullmatch(name):
            return None, f"{ptr} names {name!r}, which is not a checkpoint of this run (epoch-NNNN)"
        return self.ckpts / name, None

    def checkpoints(self) -> list[Path]:
        """This run's checkpoint folders, newest first."""
        if not self.ckpts.is_dir():
            return []
        found = [p for p in self.ckpts.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
        return sorted(found, key=lambda p: int(_CHECKPOINT.fullmatch(p.name).group(1)), reverse=True)

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints()) or (self.ckpts / "latest.json").is_file()

    def latest(self) -> Path | None:
        """The last complete checkpoint (latest.json's; else the newest folder), unchecked."""
        pointed, _ = self._pointed()
        return pointed if pointed is not None else next(iter(self.checkpoints()), None)

    @staticmethod
    def check_checkpoint(folder: Path) -> str | None:
        """Why ``folder`` is not a usable checkpoint, or None."""
        from .hub import CheckpointError, check_safetensors

        if not folder.is_dir():
            return f"{folder} is missing"
        for name in _CHECKPOINT_FILES:
            if not (folder / name).is_file():
                return f"{folder / name} is missing"
        try:
            for name in _CHECKPOINT_FILES[:2]:
                check_safetensors(folder / name)
        except CheckpointError as e:
            return str(e).split("; ")[0]
        try:
            state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            missing = [k for k in _STATE_KEYS if k not in state]
        except (ValueError, TypeError) as e:
            return f"{folder / 'state.json'} is not valid JSON ({e})"
        if missing:
            return f"{folder / 'state.json'} lacks {', '.join(missing)}"
        if state["epoch"] != int(_CHECKPOINT.fullmatch(folder.name).group(1)):
            return f"{folder / 'state.json'} is for epoch {state['epoch']}, not {folder.name}"
        return None

    def resume_point(self) -> tuple[Path, list[str]]:
        """The checkpoint to resume from: latest.json's when it is usable, else the newest usable
        one, with what was wrong with the newer ones (to say so). TrainingError when none is."""
        pointed, why = self._pointed()
        candidates = ([pointed] if pointed is not None else []) + [p for p in self.checkpoints() if p != pointed]
        problems = [why] if why else []
        for folder in candidates:
            problem = self.check_checkpoint(folder)
            if problem is None:
                return folder, problems
            problems.append(problem)
        raise TrainingError(f"nothing to resume in {self.path}: no usable checkpoint"
                            + (f" ({'; '.join(problems)})" if problems else " (checkpoints/ is empty)")
                            + "; start the run again with --overwrite")

    def save_checkpoint(self, epoch: int, model, opt, state: dict, rng: list, scaler) -> None:
        """Writes epoch-NNNN/ into a fresh folder and renames it into place, points latest.json at
        it (an atomic replace), then removes all but it and the previous checkpoint: a run killed
        at any moment leaves a complete latest checkpoint, and one damaged later has a fallback."""
        folder = self.ckpts / f"epoch-{epoch:04d}"
        tmp = new_sibling_dir(folder)
        try:
            save_tensors(model.state_dict(), tmp / "model.safetensors")
            opt_t, opt_meta = _optimizer_to_files(opt)
            save_tensors(opt_t, tmp / "optimizer.safetensors")
            write_json(tmp / "state.json", dict(state, optimizer=opt_meta, rng=rng,
                                                 scaler=scaler.state_dict() if scaler is not None else None))
            if folder.exists():  # from a run resumed at an earlier epoch
                shutil.rmtree(folder)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        write_json(self.ckpts / "latest.json", {"dir": folder.name, "epoch": epoch})
        keep = {folder.name, self.previous.name if self.previous is not None else None}
        self.previous = folder
        for old in self.ckpts.iterdir():
            # older checkpoints, and the temporary folders of runs killed while writing one
            stale = (_CHECKPOINT.fullmatch(old.name) and old.name not in keep) or old.name.startswith(".epoch-")
            if old.is_dir() and stale:
                shutil.rmtree(old, ignore_errors=True)

    def write_metrics(self, history: list[dict]) -> None:
        write_json(self.path / "metrics.json", history)
        keys = list(dict.fromkeys(k for row in history for k in row))

        def write(p):
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(history)
        atomic_write(self.path / "metrics.csv", write)


def save_model_dir(model: nn.Module, directory, cfg: dict | None = None, results: dict | None = None) -> Path:
    """The model in timm's Hub layout: :func:`eqzoo.hub.save_pretrained` for eqzoo models (config,
    safetensors, likelihoods, card); for plain timm models (the CNN baselines) config.json +
    model.safetensors, loadable with ``timm.create_model('local-dir:DIR', pretrained=True)``."""
    from .hub import is_pe_architecture, save_pretrained

    directory = Path(directory)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    model_args = {k: v for k, v in (cfg or {}).get("model_args", {}).items()}
    model_args.update(num_classes=model.num_classes, in_chans=_in_chans(model, cfg))
    if is_pe_architecture(arch):
        card = {}
        if cfg is not None:
            d = cfg["data"]
            card = {"dataset_name": d["name"], "split": "test",
                    "training": f"eqzoo train: {cfg['optim']['name']} lr {cfg['optim']['lr']}, "
                                f"{cfg['schedule']['epochs']} epochs, batch {d['batch_size']}, regularisers "
                                f"{cfg['regularizer']}, data {d['name']} (symmetry {d['symmetry']})"}
            if results:
                card["results"] = {k: v for k, v in results.items() if k in ("test_acc", "val_acc")}
        if cfg is not None and str(cfg["model"]).split(":")[0] in ("local-dir", "hf-hub"):
            model_args = None  # fine-tuned: the architecture's args come from the model itself
        else:
            model_args = {k: v for k, v in model_args.items() if k not in ("num_classes",)}
        return save_pretrained(model, directory, model_args=model_args, card_data=card)
    from timm.models._hub import save_config_for_hf

    new = new_sibling_dir(directory)  # written whole, then renamed into place (as save_pretrained)
    try:
        save_tensors(model.state_dict(), new / "model.safetensors")
        atomic_write(new / "config.json", lambda p: save_config_for_hf(model, p, model_args=model_args))
        replace_dir(new, directory)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return directory


def _record_input(model: nn.Module, splits, cfg: dict) -> None:
    """Make the saved pretrained_cfg describe the input the model was trained on: its size and,
    for the digit data sets (plain [0, 1] tensors, no normalisation), mean 0 / std 1, so that
    timm's resolve_data_config on the loaded model reproduces the training input."""
    from .data import DATASETS

    pc = getattr(model, "pretrained_cfg", None)
    if pc is None:
        return
    x, _ = splits.train[0]
    pc = dict(pc, input_size=tuple(x.shape))
    if DATASETS[cfg["data"]["name"]][0] != "natural":
        c = x.shape[0]
        pc.update(mean=(0.0,) * c, std=(1.0,) * c, crop_pct=1.0, interpolation="bilinear")
    model.pretrained_cfg = pc


def _in_chans(model, cfg) -> int:
    if cfg is not None and "in_chans" in cfg.get("model_args", {}):
        return cfg["model_args"]["in_chans"]
    return int(getattr(model, "in_chans", None) or (getattr(model, "pretrained_cfg", {}) or {}).get(
        "input_size", (3,))[0])


# -- the run ---------------------------------------------------------------------------------------------------
def _check_resume_config(cfg: dict, run: RunDir) -> None:
    saved_path = run.path / "config.yaml"
    if not saved_path.is_file():
        raise TrainingError(f"cannot resume: {saved_path} is missing")
    saved = validate_config(read_yaml(saved_path))
    changed = [k for k in config_diff(saved, cfg) if k not in RESUME_SAFE]
    if changed:
        raise TrainingError(f"cannot resume {run.path}: the config differs from the run's in {', '.join(changed)}; "
                            f"only {', '.join(sorted(RESUME_SAFE))} may change when resuming")


def _claim(run: RunDir, resume: bool, overwrite: bool, d: Dist, stack: ExitStack) -> None:
    """Rank 0 claims the run folder (see :meth:`RunDir.claimed`) for the rest of the run; every
    process learns whether it could."""
    error = None
    if d.main:
        try:
            stack.enter_context(run.claimed(resume, overwrite))
        except TrainingError as e:
            error = str(e)
    if d.on:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrainingError(error)


def _run(cfg: dict, resume: bool = False, stop_after_epoch: int | None = None, overwrite: bool = False) -> dict:
    from tqdm import tqdm

    from .data import build_datasets, data_info
    from .regularizers import regularization

    cfg = validate_config(cfg)
    d = _init_dist(cfg["device"])
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    stack = ExitStack()
    run = RunDir(cfg["output"])
    claimed = False
    try:
        device = _device(cfg, d)
        # read-only checks first, so that a mistake costs no build; the claim below repeats them
        if resume and not run.has_checkpoint():
            raise TrainingError(f"nothing to resume in {run.path}: no checkpoint (checkpoints/latest.json)"
                                + ("; start the run again with --overwrite" if run.holds_run() else ""))
        if not resume and not overwrite and run.holds_run():
            raise TrainingError(run._holds_message(run.holds_run()))
        if resume:
            _check_resume_config(cfg, run)
        info = data_info(cfg["data"])  # missing data files fail here, before anything is built

        torch.manual_seed(cfg["seed"])  # same initial weights on every process
        np.random.seed(cfg["seed"])
        random.seed(cfg["seed"])
        model = build_model(cfg, info, pretrained=cfg["pretrained"] and not resume)
        splits = build_datasets(cfg["data"], model)
        if splits.num_classes != info["num_classes"]:
            raise TrainingError(f"data set has {splits.num_classes} classes, expected {info['num_classes']}")
        _claim(run, resume, overwrite, d, stack)
        claimed = True
        if d.main and not resume:  # at once: the folder now holds this run
            atomic_write(run.path / "config.yaml", lambda p: p.write_text(dump_config(cfg), encoding="utf-8"))
        model.to(device)
        channels_last = cfg["channels_last"] and device.type == "cuda"
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, model)
        autocast, scaler = _amp(cfg, device)
        train_loader, sampler, val_loader, test_loader = _loaders(cfg, splits, d, device)
        epochs = cfg["schedule"]["epochs"]
        steps_per_epoch = len(train_loader)
        total = epochs * steps_per_epoch
        warmup = round(cfg["schedule"]["warmup_epochs"] * steps_per_epoch)
        state = {"epoch": 0, "step": 0, "best_epoch": None, "best_val_acc": None, "history": []}

        if resume:
            latest, problems = run.resume_point()
            for problem in problems:  # a damaged newer checkpoint: say so, and which one is used
                _log(d, f"warning: {problem}; resuming from {latest.name} instead")
            _log(d, f"resuming {run.path} from {latest.name}")
            model.load_state_dict(_load_tensors(latest / "model.safetensors"))
            saved = json.loads((latest / "state.json").read_text())
            _optimizer_from_files(opt, _load_tensors(latest / "optimizer.safetensors"), saved["optimizer"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            state = {k: saved[k] for k in state}
            run.previous = latest
            if len(saved["rng"]) == d.world:
                _set_rng_state(saved["rng"][d.rank])
            else:
                _log(d, f"warning: checkpoint from {len(saved['rng'])} processes, now {d.world}: RNG streams restart")
                torch.manual_seed(cfg["seed"] + 1000 * state["epoch"] + d.rank)
        else:
            # after the identical init: give each process its own stream (dropout, augmentation)
            torch.manual_seed(cfg["seed"] * 7919 + d.rank)

        ddp = model
        if d.on:
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        writer = None
        if d.main and cfg["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(run.path / "tb"))
            except ImportError:
                pass  # TensorBoard is optional: CSV and JSON are always written
        reg_w = cfg["regularizer"]
        _log(d, f"{cfg['model']} on {cfg['data']['name']}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                f"{len(splits.train)} training images, {steps_per_epoch} steps/epoch, {d.world} process(es), {device}")

        stop = epochs if stop_after_epoch is None else min(epochs, stop_after_epoch)
        for epoch in range(state["epoch"], stop):
            t0 = time.time()
            sampler.set_epoch(epoch)
            _set_train(ddp, cfg)
            sums = np.zeros(4)  # loss*n, ce*n, correct, n
            reg_sums = {"alignment": 0.0, "kl_chain": 0.0, "kl_uniform": 0.0}
            lam_kl = lambda_kl(model)
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                       disable=not (cfg["progress"] and d.main), dynamic_ncols=True)
            for i, (x, y) in enumerate(bar):
                lr = lr_at(state["step"], total, warmup, cfg["optim"]["lr"], cfg["schedule"]["min_lr"])
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    logits = ddp(x)
                ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg["optim"]["label_smoothing"])
                # the regularisers depend on the parameters only: every process adds the same value,
                # and DDP's gradient averaging leaves its gradient unchanged. Computed outside
                # autocast: softmax/log/KL of the likelihoods must stay in fp32
                reg, parts = regularization(model, **reg_w)
                loss = ce + reg
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg["optim"]["grad_clip"]:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["optim"]["grad_clip"])
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                state["step"] += 1
                n = len(y)
                correct = float((logits.detach().argmax(-1) == y).sum())
                sums += [float(loss.detach()) * n, float(ce.detach()) * n, correct, n]
                for k in reg_sums:
                    reg_sums[k] += float(parts[k].detach())
                if (i + 1) % cfg["log_interval"] == 0:
                    lam_kl = lambda_kl(model)
                bar.set_postfix(loss=f"{sums[0] / sums[3]:.4f}", acc=f"{sums[2] / sums[3]:.3f}",
                                lam_kl=f"{lam_kl:.4f}", lr=f"{lr:.2e}")
            bar.close()
            tot = _all_sum(sums.tolist(), d, device)
            row = {"epoch": epoch + 1, "step": state["step"], "lr": lr if steps_per_epoch else 0.0,
                   "train_loss": tot[0] / max(tot[3], 1), "train_ce": tot[1] / max(tot[3], 1),
                   "train_acc": tot[2] / max(tot[3], 1),
                   **{f"reg_{k}": v / max(steps_per_epoch, 1) for k, v in reg_sums.items()},
                   "lambda_kl": lambda_kl(model)}
            if val_loader is not None:
                v = _evaluate_loader(ddp, val_loader, device, autocast, d, channels_last)
                row.update(val_loss=v["loss"], val_acc=v["acc"])
                if state["best_val_acc"] is None or v["acc"] > state["best_val_acc"]:
                    state["best_val_acc"], state["best_epoch"] = v["acc"], epoch + 1
                    if d.main:
                        save_tensors(model.state_dict(), run.path / "best.safetensors")
            row["time"] = time.time() - t0
            state["history"].append(row)
            state["epoch"] = epoch + 1
            rng = [_rng_state()]
            if d.on:
                rng = [None] * d.world
                dist.all_gather_object(rng, _rng_state())
            if d.main:
                run.save_checkpoint(epoch + 1, model, opt, state, rng, scaler)
                run.write_metrics(state["history"])
                if writer is not None:
                    for k, v in row.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
            _log(d, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if d.on:
                dist.barrier()  # nobody runs ahead of rank 0's checkpoint

        result = {"run_dir": str(run.path), "epochs_done": state["epoch"], "epochs": epochs,
                  "best_epoch": state["best_epoch"], "best_val_acc": state["best_val_acc"],
                  "history": state["history"]}
        if state["epoch"] < epochs:
            _log(d, f"stopped after epoch {state['epoch']}/{epochs}; continue with --resume")
            return dict(result, status="stopped")

        # the end: test the best-on-validation weights, write results and the Hub-format model
        if state["best_epoch"] is not None and (run.path / "best.safetensors").is_file():
            model.load_state_dict(_load_tensors(run.path / "best.safetensors"))
        results = {"best_epoch": state["best_epoch"] or epochs, "val_acc": state["best_val_acc"]}
        if test_loader is not None:
            t = _evaluate_loader(ddp, test_loader, device, autocast, d, channels_last)
            results.update(test_acc=t["acc"], test_loss=t["loss"], test_n=t["n"])
        results["lambda_kl"] = lambda_kl(model)
        model_dir = None
        _record_input(model, splits, cfg)
        if d.main:
            write_json(run.path / "results.json", results)
            if cfg["save_model"]:
                model.to(memory_format=torch.contiguous_format)
                model_dir = str(save_model_dir(model, run.path / HUB_DIR, cfg, results))
            if writer is not None:
                writer.close()
            _log(d, "results: " + json.dumps(results))
        if d.on:
            dist.barrier()
        return dict(result, status="finished", results=results, model_dir=model_dir)
    except KeyboardInterrupt:
        if d.main and claimed:  # Ctrl-C while training: say how to go on
            latest = run.latest()
            hint = (f"resume from {latest.name} with: eqzoo train --resume {run.path}" if latest is not None else
                    f"no epoch was completed: start again with --overwrite (output={run.path})")
            print(f"\ninterrupted; {hint}", file=sys.stderr)
        raise
    finally:
        stack.close()
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg, resume: bool = False, stop_after_epoch: int | None = None, overrides=None,
          overwrite: bool = False) -> dict:
    """Train from a config (path, dict or resolved config) into ``cfg.output``; returns a summary:
    ``status`` ("finished" / "stopped"), ``run_dir``, ``history`` (one dict per epoch), ``results``
    (best epoch, val/test accuracy), ``model_dir`` (the Hub-format folder, RUN/hub).

    ``resume`` continues the run in ``cfg.output`` from its last checkpoint; ``stop_after_epoch``
    stops (resumably) once that many epochs are done. A folder that holds another run is refused
    unless resuming, or with ``overwrite`` (which deletes that run's files)."""
    return _run(load_config(cfg, overrides), resume, stop_after_epoch, overwrite)


def _finetune_config(cfg: dict, source: str | None, explicit_model_args: dict) -> dict:
    """The config a fine-tuning run uses and records. With a ``source``, the model and its
    architecture come from it: the config's own ``model`` and ``model_args`` describe another
    model (e.g. the CNN baseline a data config was written for) and are replaced; only model_args
    given as overrides (``model_args.drop_path_rate=0.1``) apply."""
    cfg = dict(cfg)
    if source is not None:
        _source(source)  # a mistyped path fails first
        unused = [k for k in cfg["model_args"] if k not in explicit_model_args]
        if (cfg["model"] != source or unused) and int(os.environ.get("RANK", "0")) == 0:
            print(f"fine-tuning {source}: the config's model ({cfg['model']})"
                  + (f" and model_args ({', '.join(unused)})" if unused else "")
                  + " describe another model and are not used", file=sys.stderr)
        cfg.update(model=source, model_args=dict(explicit_model_args))
    cfg["model"], cfg["pretrained"] = _source(cfg["model"]), True
    return validate_config(cfg)


def finetune(cfg, source: str | None = None, resume: bool = False, stop_after_epoch: int | None = None,
             overrides=None, overwrite: bool = False) -> dict:
    """Fine-tune a pretrained model (``source`` or ``cfg.model``: ``hf-hub:org/name``,
    ``local-dir:PATH``, a run directory (its hub/) or model directory, or a registry ``arch.tag``) on ``cfg.data`` with a
    new classifier for its classes. λ keeps learning unless ``freeze_likelihood``. With ``source``,
    the config's model and model_args are not used (see :func:`_finetune_config`)."""
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    explicit = dict((overrides or {}).get("model_args") or {})
    cfg = _finetune_config(load_config(cfg, overrides), source, explicit)
    return _run(cfg, resume, stop_after_epoch, overwrite)


def evaluate(cfg, source: str | None = None, split: str = "test") -> dict:
    """Accuracy and loss of a trained model on a split (``train``/``val``/``test``) of ``cfg.data``.

    ``source``: a run directory (its ``hub/``), a model directory, ``local-dir:``/``hf-hub:`` or a
    registry tag; default ``cfg.model``. Returns ``{"split", "loss", "acc", "n", "lambda_kl", "model"}``."""
    import timm

    import eqzoo.models  # noqa: F401

    from .data import build_datasets, data_info

    cfg = load_config(cfg)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}")
    src = _source(source or cfg["model"])
    info = data_info(cfg["data"])
    d = _init_dist(cfg["device"])
    try:
        device = _device(cfg, d)
        model = timm.create_model(src, pretrained=True)
        if model.num_classes != info["num_classes"]:
            raise TrainingError(f"{src} has {model.num_classes} classes, data set {cfg['data']['name']} has "
                                f"{info['num_classes']}: evaluate it on the data it was trained for")
        model.to(device)
        splits = build_datasets(cfg["data"], model)
        ds = getattr(splits, split)
        if ds is None:
            raise ConfigError(f"the {split} split of {cfg['data']['name']} is empty (data.{split}_size)")
        autocast, _ = _amp(cfg, device)
        ebs = max(1, (cfg["data"]["eval_batch_size"] or 2 * cfg["data"]["batch_size"]) // d.world)
        loader = DataLoader(ds, batch_size=ebs, sampler=_Shard(len(ds), d), num_workers=cfg["data"]["workers"])
        out = _evaluate_loader(model, loader, device, autocast, d)
        return {"split": split, **out, "lambda_kl": lambda_kl(model), "model": src}
    finally:
        if d.owned and dist.is_initialized():
            dist.destroy_process_group()


# -- command line ------------------------------------------------------------------------------------------
# Each subcommand is a (help, configure(parser), run(namespace) -> exit status) triple, the shape
# eqzoo.cli.register takes; cmd_* wrap them for argv lists (python -m eqzoo.train, tests).
def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, dotted keys and YAML values: optim.lr=1e-3 data.symmetry=[C1,SO2]")


def configure_train(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a stopped or killed run from its last checkpoint (the config's output, or RUN_DIR)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds a run (deleting that run's files)")
    p.add_argument("--stop-after-epoch", type=int, default=None, metavar="N",
                   help="stop (resumably) once N epochs are done")


def configure_finetune(p: argparse.ArgumentParser) -> None:
    configure_train(p)
    p.add_argument("--from", dest="source", metavar="SOURCE",
                   help="pretrained model: hf-hub:org/name, local-dir:PATH, a run/model directory or arch.tag "
                        "(default: the config's model); the config's model and model_args are then not used")


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="run directory, model directory, hf-hub:org/name, local-dir:PATH or arch.tag")
    _common_args(p)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--output", "-o", help="also write the metrics to this JSON file")


def _resolve(args) -> dict:
    """Config from --config, or from RUN_DIR/config.yaml when resuming a directory."""
    source = args.config
    resume_dir = args.resume if isinstance(getattr(args, "resume", None), str) else None
    if resume_dir:
        saved = Path(resume_dir) / "config.yaml"
        if source is None:
            if not saved.is_file():
                raise TrainingError(f"cannot resume {resume_dir}: {saved} is missing")
            source = read_yaml(saved)
        return load_config(source, list(args.overrides) + [f"output={resume_dir}"])
    if source is None:
        raise ConfigError("--config is required (or --resume RUN_DIR)")
    return load_config(source, list(args.overrides))


def run_train(args: argparse.Namespace) -> int:
    _run(_resolve(args), bool(args.resume), args.stop_after_epoch, args.overwrite)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    if not (args.resume and args.config is None):  # a resumed run's config.yaml is already the fine-tuning one
        explicit = parse_overrides(args.overrides).get("model_args") or {}
        cfg = _finetune_config(cfg, args.source, explicit)
    _run(cfg, bool(args.resume), args.stop_after_epoch, args.overwrite)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    _source(args.source)  # a mistyped path is named as such, before the config is looked for
    run_cfg = Path(args.source) / "config.yaml"
    source = args.config if args.config else (read_yaml(run_cfg) if run_cfg.is_file() else None)
    overrides = list(args.overrides)
    if source is None:
        overrides.append(f"model={args.source}")
    out = evaluate(load_config(source, overrides), args.source, args.split)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(out, indent=1))
        if args.output:
            write_json(Path(args.output), out)
    return 0


SUBCOMMANDS = {
    "train": ("train a model from a YAML config (eqzoo train --config configs/NAME.yaml [KEY=VALUE ...])",
              configure_train, run_train),
    "finetune": ("fine-tune a pretrained model on a new data set with a new head", configure_finetune, run_finetune),
    "eval": ("evaluate a trained model (run directory, model folder, hf-hub:, local-dir:) on a data split",
             configure_eval, run_eval),
}


def _cmd(name: str, argv) -> int:
    from .cli import add_debug_flag, guarded

    help_, configure, run = SUBCOMMANDS[name]
    p = argparse.ArgumentParser(prog=f"eqzoo {name}", description=help_)
    configure(p)
    add_debug_flag(p)
    args = p.parse_args(argv)
    return guarded(f"eqzoo {name}", lambda: run(args), args.debug)


def cmd_train(argv=None) -> int:
    """``eqzoo train --config configs/NAME.yaml [KEY=VALUE ...] [--resume [RUN_DIR]] [--stop-after-epoch N]``"""
    return _cmd("train", argv)


def cmd_finetune(argv=None) -> int:
    """``eqzoo finetune --config CFG [--from SOURCE] [KEY=VALUE ...] [--resume [RUN_DIR]]``"""
    return _cmd("finetune", argv)


def cmd_eval(argv=None) -> int:
    """``eqzoo eval SOURCE [--config CFG] [--split test] [--output FILE] [KEY=VALUE ...]``

    SOURCE is a run directory (its config gives the data), a model directory, ``local-dir:``,
    ``hf-hub:`` or a registry tag (then --config or data.* overrides give the data)."""
    return _cmd("eval", argv)


def main(argv=None) -> int:
    """``python -m eqzoo.train [train|finetune|eval] ...`` (default ``train``), also under torchrun."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return _cmd(argv[0], argv[1:])
    return cmd_train(argv)


if __name__ == "__main__":
    sys.exit(main())
