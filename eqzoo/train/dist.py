"""Processes and devices of a run: one process, or DDP under torchrun (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from tqdm import tqdm

from ..errors import TrainingError


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

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def init_dist(device_cfg: str) -> Dist:
    """This process's place in the run, from torchrun's environment."""
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


def run_device(cfg: dict, d: Dist) -> torch.device:
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"device {cfg['device']!r} requested but CUDA is not available; set device=cpu")
        return torch.device("cuda", d.local_rank if d.on else (int(want[5:]) if ":" in want else 0))
    return torch.device("cpu")


logger = logging.getLogger("eqzoo.train")


class _Console(logging.Handler):
    """Lines on the stdout of the moment, through tqdm (a progress bar on a terminal stays whole)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def console_logging() -> None:
    """The engine's messages go through the ``eqzoo.train`` logger; unless an application gave it
    handlers of its own, they are printed on stdout (INFO and above), as timm's train.py does."""
    if not logger.handlers:
        logger.addHandler(_Console())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def log(d: Dist, msg: str, level: int = logging.INFO) -> None:
    """A message from the main process."""
    if d.main:
        logger.log(level, msg)


def all_sum(values: list[float], d: Dist, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    if d.on:
        dist.all_reduce(t)
    return t.tolist()


class Shard(Sampler):
    """Evaluation sampler: process r takes indices r, r + N, ... (no padding, unlike
    DistributedSampler, so summed metrics count every image exactly once)."""

    def __init__(self, n: int, d: Dist):
        self.idx = list(range(d.rank, n, d.world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)
