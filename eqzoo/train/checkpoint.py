"""The files of one run, and its checkpoints::

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
"""
from __future__ import annotations

import base64
import csv
import json
import math
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, check_safetensors, load_tensors, locked, new_sibling_dir, save_tensors, write_json
from ..errors import CheckpointError, TrainingError
from ..sources import HUB_DIR

__all__ = ["RunDir", "rng_state", "set_rng_state", "optimizer_to_files", "optimizer_from_files", "load_checkpoint",
           "finite_tensors"]


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(_unb64(s["torch"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(c) for c in s["cuda"]][:torch.cuda.device_count()])
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _to_json(value, key: str, tensors: dict):
    """The JSON form of an optimizer state value: its tensors moved into ``tensors`` under ``key``
    and referred to by it, dtypes and tuples marked (timm's optimizers keep lists of tensors,
    per-group step counts and dtypes in their state)."""
    if torch.is_tensor(value):
        tensors[key] = value
        return {"__tensor__": key}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{key}.{k}", tensors) for k, v in value.items()}
    return value


def _from_json(value, tensors: dict):
    if isinstance(value, list):
        return [_from_json(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__dtype__" in value:
        dtype = getattr(torch, str(value["__dtype__"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value['__dtype__']!r} is not a torch dtype")
        return dtype
    if "__tuple__" in value:
        return tuple(_from_json(v, tensors) for v in value["__tuple__"])
    return {k: _from_json(v, tensors) for k, v in value.items()}


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as (tensors for safetensors, JSON): the state_dict with every tensor moved
    into the first, by its path (``state.<param id>.exp_avg``, ``param_groups.0.step``, ...)."""
    tensors: dict = {}
    meta = {k: _to_json(v, k, tensors) for k, v in opt.state_dict().items()}
    return tensors, meta


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    sd = {k: _from_json(v, tensors) for k, v in meta.items()}
    sd["state"] = {int(pid): st for pid, st in sd["state"].items()}  # (JSON keys are strings)
    opt.load_state_dict(sd)


_CHECKPOINT = re.compile(r"epoch-(\d{4,})")
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
_STATE_KEYS = ("epoch", "step", "best_epoch", "best_val_acc", "history", "optimizer", "rng", "config")


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
        self.held = False  # this process holds the folder for a run (see claimed)

    def check_is_folder(self) -> None:
        if (self.path.is_symlink() or self.path.exists()) and not self.path.is_dir():
            raise TrainingError(f"output {self.path} is not a folder (a file, or a link to nothing); "
                                "set output=<a folder>")

    def holds_run(self) -> list[str]:
        """The run files in the folder (empty: no run)."""
        return [name for name in self.RUN_FILES if (self.path / name).exists()]

    def clear(self) -> None:
        """Remove a previous run's files (``--overwrite``)."""
        for name in self.RUN_FILES:
            p = self.path / name
            if p.is_symlink() or (p.exists() and not p.is_dir()):
                p.unlink()  # a link is removed, never what it points to
            elif p.is_dir():
                shutil.rmtree(p)

    @contextmanager
    def claimed(self, resume: bool, overwrite: bool):
        """Hold the run folder for a run: refuses a folder another run is writing to right now,
        and (unless resuming) one that holds a run, except with ``overwrite``. The check and the
        claim are one step under the lock, so of two runs started at once one is refused."""
        self.check_is_folder()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainingError(f"cannot create the run folder {self.path}: {e.strerror}") from None
        with locked(self.path / self.LOCK, blocking=False) as got:
            if not got:
                raise TrainingError(f"another eqzoo run is writing to {self.path} right now; wait for it to "
                                    "finish, or set output=<another folder>")
            if not resume:
                held = self.holds_run()
                if held and not overwrite:
                    raise TrainingError(self.holds_message(held))
                if held:
                    self.clear()
            self.held = True
            try:
                yield
            finally:
                self.held = False

    def holds_message(self, held: list[str]) -> str:
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
        except (ValueError, KeyError, TypeError, RecursionError) as e:
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
        except (ValueError, TypeError, RecursionError) as e:  # (deep nesting: RecursionError)
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

    def save_checkpoint(self, epoch: int, model, opt, state: dict, rng: list, scaler, config: dict) -> None:
        """Writes epoch-NNNN/ into a fresh folder and renames it into place, points latest.json at
        it (an atomic replace), then removes all but it and the previous checkpoint: a run killed
        at any moment leaves a complete latest checkpoint, and one damaged later has a fallback.
        The resolved ``config`` is pinned in state.json: a resume is checked against it."""
        folder = self.ckpts / f"epoch-{epoch:04d}"
        tmp = new_sibling_dir(folder)
        try:
            save_tensors(model.state_dict(), tmp / "model.safetensors")
            opt_t, opt_meta = optimizer_to_files(opt)
            save_tensors(opt_t, tmp / "optimizer.safetensors")
            write_json(tmp / "state.json", dict(state, optimizer=opt_meta, rng=rng, config=config,
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

    def clear_failed_start(self) -> None:
        """After a start that failed before its first checkpoint: remove what it wrote, so that the
        same command can be run again."""
        if not self.has_checkpoint():
            self.clear()

    def write_metrics(self, history: list[dict]) -> None:
        write_json(self.path / "metrics.json", history)
        keys = list(dict.fromkeys(k for row in history for k in row))

        def write(p):
            with open(p, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(history)
        atomic_write(self.path / "metrics.csv", write)


def _non_finite(value, where: str) -> str | None:
    """Where in a JSON value a NaN or infinity is (Python's json reads and writes them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((w for k, v in items if (w := _non_finite(v, f"{where}.{k}")) is not None), None)


def finite_tensors(path: Path) -> dict:
    """The tensors of a safetensors file; CheckpointError naming the file and tensor if one holds NaN or inf."""
    tensors = load_tensors(path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds NaN or infinite values")
    return tensors


def load_checkpoint(folder: Path, model, opt, scaler, state: dict, steps_per_epoch: int) -> dict:
    """Apply checkpoint ``folder`` to the model, optimizer, scaler and ``state`` (updated in place);
    returns its state.json. Raises :class:`CheckpointError` naming the file and what is wrong:
    non-finite tensors, or a state.json whose values do not fit this run (step, param groups, RNG)."""
    weights = finite_tensors(folder / "model.safetensors")
    opt_tensors = finite_tensors(folder / "optimizer.safetensors")
    path = folder / "state.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        bad = _non_finite(saved["optimizer"], "optimizer")
        if bad is not None:
            raise ValueError(f"{bad} is not a finite number")
        epoch, step = saved["epoch"], saved["step"]
        if not (type(epoch) is int and type(step) is int and step == epoch * steps_per_epoch):
            raise ValueError(f"step {step!r} is not epoch {epoch!r} times the {steps_per_epoch} steps of an epoch")
        if not (isinstance(saved["rng"], list) and saved["rng"] and isinstance(saved["history"], list)
                and len(saved["history"]) == epoch):
            raise ValueError("rng or history does not fit the epoch")
        now = rng_state()
        for s in saved["rng"]:  # every process's RNG state must be applicable
            set_rng_state(s)
        set_rng_state(now)
        optimizer_from_files(opt, opt_tensors, saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update({k: saved[k] for k in state})
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, RecursionError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit the model ({first})") from None
    return saved
