"""One epoch of training and one pass of evaluation, on a :class:`~eqzoo.train.run.Run`."""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from timm.utils import accuracy

from ..errors import ConfigError, TrainingError
from ..regularizers import regularization
from .dist import Dist, Shard, all_sum
from .model import lambda_kl, set_train

REGULARIZERS = ("alignment", "kl_chain", "kl_uniform")


def eval_loader(dataset, cfg: dict, d: Dist, **kw) -> DataLoader | None:
    """Evaluation batches of ``dataset`` for this process (None for an empty split)."""
    if dataset is None:
        return None
    dc = cfg["data"]
    batch = max(1, (dc["eval_batch_size"] or 2 * dc["batch_size"]) // d.world)
    return DataLoader(dataset, batch_size=batch, sampler=Shard(len(dataset), d), num_workers=dc["workers"], **kw)


def make_loaders(cfg: dict, splits, d: Dist, device: torch.device):
    """(train loader, its sampler, val loader, test loader) of this process: ``data.batch_size``
    is the global batch, split over the processes."""
    dc = cfg["data"]
    if dc["batch_size"] % d.world:
        raise ConfigError(f"config key 'data.batch_size' ({dc['batch_size']}) is the global batch and must be "
                          f"divisible by the number of processes ({d.world})")
    local = dc["batch_size"] // d.world
    # DistributedSampler also with one process: the data order of epoch e is then a function of
    # (seed, e) alone, which is what makes resume exact and 1-vs-N-process runs comparable
    sampler = DistributedSampler(splits.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg["seed"])
    kw = dict(pin_memory=device.type == "cuda", persistent_workers=False)
    train = DataLoader(splits.train, batch_size=local, sampler=sampler, drop_last=len(sampler) >= local,
                       num_workers=dc["workers"], **kw)
    return train, sampler, eval_loader(splits.val, cfg, d, **kw), eval_loader(splits.test, cfg, d, **kw)


def _to_device(x, y, device, channels_last: bool):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


@torch.no_grad()
def evaluate_loader(model, loader, device, autocast, d: Dist, channels_last: bool = False) -> dict:
    """Loss, top-1 (``acc``) and top-5 accuracy and count over a loader, summed over the processes."""
    model.eval()
    loss_sum, top1, top5, n = 0.0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = _to_device(x, y, device, channels_last)
        with autocast():
            logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        a1, a5 = accuracy(logits, y, topk=(1, min(5, logits.shape[-1])))  # percentages of the batch
        top1, top5, n = top1 + float(a1) * len(y) / 100, top5 + float(a5) * len(y) / 100, n + len(y)
    loss_sum, top1, top5, n = all_sum([loss_sum, top1, top5, n], d, device)
    return {"loss": loss_sum / max(n, 1), "acc": round(top1) / max(n, 1), "top5": round(top5) / max(n, 1), "n": int(n)}


def _check_finite(r, ce, parts) -> None:
    """Stop at the first non-finite loss, naming the step and the term: training on would only
    spread NaN into every weight. All processes stop together (DDP would wait forever otherwise)."""
    terms = {"task loss (cross-entropy)": ce, **{f"regulariser {k}": v for k, v in parts.items()}}
    bad = [name for name, v in terms.items() if not torch.isfinite(v.detach()).all()]
    if (all_sum([float(len(bad))], r.d, r.device)[0] if r.d.on else bad):
        what = ", ".join(f"{name} = {float(terms[name].detach())}" for name in bad) if bad else "on another process"
        raise TrainingError(f"non-finite loss at step {r.state['step'] + 1} (epoch {r.state['epoch'] + 1}): {what}; "
                            "training stopped (lower optim.lr, set optim.grad_clip, or check the data)")


def _step(r, x, y):
    """One optimiser step on a batch: (logits, loss, cross-entropy, regulariser parts)."""
    cfg = r.cfg
    with r.autocast():
        logits = r.net(x)
    ce = F.cross_entropy(logits.float(), y, label_smoothing=cfg["optim"]["label_smoothing"])
    # the regularisers depend on the parameters only: every process adds the same value, and DDP's
    # gradient averaging leaves its gradient unchanged. Computed outside autocast: softmax/log/KL
    # of the likelihoods must stay in fp32
    reg, parts = regularization(r.model, **cfg["regularizer"])
    _check_finite(r, ce, parts)
    loss = ce + reg
    r.opt.zero_grad(set_to_none=True)
    if r.scaler is not None:
        r.scaler.scale(loss).backward()
        r.scaler.unscale_(r.opt)
    else:
        loss.backward()
    if cfg["optim"]["grad_clip"]:
        nn.utils.clip_grad_norm_(r.model.parameters(), cfg["optim"]["grad_clip"])
    if r.scaler is not None:
        r.scaler.step(r.opt)
        r.scaler.update()
    else:
        r.opt.step()
    r.state["step"] += 1
    return logits, loss, ce, parts


def train_epoch(r, epoch: int) -> dict:
    """Train ``r.model`` for one epoch; returns the epoch's metrics row (training part)."""
    r.sampler.set_epoch(epoch)
    set_train(r.net, r.cfg["freeze_bn"])
    sums = np.zeros(4)  # loss*n, ce*n, correct, n
    reg_sums = dict.fromkeys(REGULARIZERS, 0.0)
    lam_kl, lr = lambda_kl(r.model), 0.0
    bar = tqdm(r.train_loader, desc=f"epoch {epoch + 1}/{r.cfg['schedule']['epochs']}", leave=False,
               disable=not (r.cfg["progress"] and r.d.main and sys.stderr.isatty()), dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        r.sched.step_update(r.state["step"])  # the schedule's lr for this update (times each group's lr_scale)
        lr = r.opt.param_groups[0]["lr"]
        x, y = _to_device(x, y, r.device, r.channels_last)
        logits, loss, ce, parts = _step(r, x, y)
        n = len(y)
        sums += [float(loss.detach()) * n, float(ce.detach()) * n, float((logits.detach().argmax(-1) == y).sum()), n]
        for k in reg_sums:
            reg_sums[k] += float(parts[k].detach())
        if (i + 1) % r.cfg["log_interval"] == 0:
            lam_kl = lambda_kl(r.model)
        bar.set_postfix(loss=f"{sums[0] / sums[3]:.4f}", acc=f"{sums[2] / sums[3]:.3f}", lam_kl=f"{lam_kl:.4f}",
                        lr=f"{lr:.2e}")
    bar.close()
    tot, steps = all_sum(sums.tolist(), r.d, r.device), max(len(r.train_loader), 1)
    return {"epoch": epoch + 1, "step": r.state["step"], "lr": lr,
            "train_loss": tot[0] / max(tot[3], 1), "train_ce": tot[1] / max(tot[3], 1),
            "train_acc": tot[2] / max(tot[3], 1), **{f"reg_{k}": v / steps for k, v in reg_sums.items()},
            "lambda_kl": lambda_kl(r.model)}
