"""The model of a run and how it is optimised: build, optimiser and learning-rate schedule (timm's),
precision."""
from __future__ import annotations

import difflib
import importlib.util
from contextlib import nullcontext

import timm
import timm.optim
import timm.scheduler
import torch
from torch import nn

from .. import models  # noqa: F401  (registers the pe_* models with timm)
from ..errors import ConfigError, ModelArgError
from ..likelihood import likelihoods
from ..sources import resolve_model


def build_model(cfg: dict, info: dict, pretrained: bool | None = None) -> nn.Module:
    """``timm.create_model(cfg.model, num_classes=<data>, in_chans=<data>, **cfg.model_args)``; with
    ``pretrained`` (fine-tuning) the checkpoint's head is replaced when the class count differs, and
    also when it matches if ``reset_head``. Likelihoods are frozen with ``freeze_likelihood``."""
    pretrained = cfg["pretrained"] if pretrained is None else pretrained
    kwargs = dict(cfg["model_args"])
    kwargs["num_classes"] = info["num_classes"]
    kwargs.setdefault("in_chans", info["in_chans"])
    try:
        model = timm.create_model(resolve_model(cfg["model"]), pretrained=pretrained, **kwargs)
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
        for lam in likelihoods(model).values():
            lam.coefficients.requires_grad_(False)
    return model


def lambda_kl(model: nn.Module) -> float:
    """Mean KL(λ ‖ uniform) over the model's distinct likelihoods (0 for a model without any): how
    far from fully equivariant the model has moved."""
    lams = list(likelihoods(model).values())
    if not lams:
        return 0.0
    with torch.no_grad():
        return float(sum(float(lam.kl_uniform()) for lam in lams) / len(lams))


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._NormBase) or (
        hasattr(m, "running_mean") and hasattr(m, "running_var"))


def set_train(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode; with ``freeze_bn`` the norms normalise with their running statistics and
    keep them as loaded."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if _is_norm(m):
                m.eval()


def _param_groups(model: nn.Module, weight_decay: float, likelihood_lr_scale: float = 1.0) -> list[dict]:
    """Weight decay on conv/linear weights only. Biases and norm parameters follow the usual
    practice; the likelihood coefficients get a group of their own without decay (decay would pull
    λ's logits to 0, an extra prior beside the regularisers the config weighs) and with their own
    learning-rate scale (``lr_scale``, applied by the schedule)."""
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


def check_optimizer(name: str) -> None:
    """``optim.name`` is one of timm's optimizers that a plain ``loss.backward()`` drives (checked
    when a run starts, before anything is built)."""
    names = timm.optim.list_optimizers()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise ConfigError(f"config key 'optim.name': unknown optimizer {name!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + "; accepted: timm.optim.list_optimizers(), e.g. adamw, sgd, lamb, lion, adan")
    info = timm.optim.get_optimizer_info(name)
    if info.second_order:
        raise ConfigError(f"config key 'optim.name': {name} is a second-order optimizer (it needs "
                          "loss.backward(create_graph=True)), which the eqzoo engine does not run")
    if isinstance(info.opt_class, str):  # apex / bitsandbytes: a CUDA package, imported by name
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
            raise ConfigError(f"config key 'optim.name': {name} needs CUDA and {package}, which is not installed "
                              "or has no GPU here")


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2`` on the engine's parameter groups (λ in a group of its own)."""
    o = cfg["optim"]
    check_optimizer(o["name"])
    info = timm.optim.get_optimizer_info(o["name"])
    extra = {"betas": tuple(o["betas"])} if info.has_betas and info.num_betas == 2 else {}
    groups = _param_groups(model, o["weight_decay"], o["likelihood_lr_scale"])
    return timm.optim.create_optimizer_v2(groups, opt=o["name"], lr=o["lr"], weight_decay=o["weight_decay"],
                                          momentum=o["momentum"], **extra)


def build_scheduler(cfg: dict, opt: torch.optim.Optimizer, updates_per_epoch: int):
    """timm's scheduler of ``schedule.name``, stepped after every update (``step_update``): its
    learning rate is a function of the update count alone, so a resumed run continues exactly. It
    sets each group's lr to the schedule's value times the group's ``lr_scale``."""
    s = cfg["schedule"]
    sched, _ = timm.scheduler.create_scheduler_v2(
        opt, sched=s["name"], num_epochs=s["epochs"], decay_epochs=s["decay_epochs"],
        decay_milestones=s["decay_milestones"], decay_rate=s["decay_rate"], min_lr=s["min_lr"], warmup_lr=0.0,
        warmup_epochs=s["warmup_epochs"], step_on_epochs=False, updates_per_epoch=max(1, updates_per_epoch))
    return sched


def mixed_precision(cfg: dict, device: torch.device):
    """(autocast context factory, GradScaler or None). CUDA only; bf16 where the GPU has it (no
    loss scaling needed), else fp16 with a GradScaler."""
    if not (cfg["amp"] and device.type == "cuda"):
        return nullcontext, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler
