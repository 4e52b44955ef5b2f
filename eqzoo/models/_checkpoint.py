"""A checkpoint meets the model it is loaded into: timm's ``pretrained_filter_fn`` for pe models."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import CheckpointError
from ._schema import WEIGHTS_NAME, basis_fingerprint, model_head, structure_fingerprint, versions

_logger = logging.getLogger(__name__)


def _check_checkpoint(state_dict: dict, model: nn.Module, checkpoint: dict) -> None:
    """Refuse weights made for other bases, another likelihood sharing or head, and integer
    tensors where the model has floats (``load_state_dict`` would cast them silently)."""
    expected, source = checkpoint["eqzoo"], checkpoint["source"]
    ours = basis_fingerprint(model)
    if ours != expected.get("basis_fingerprint"):
        saved, now = expected.get("versions", {}), versions()
        raise CheckpointError(
            f"basis fingerprint mismatch: the weights were trained with bases {expected.get('basis_fingerprint')} "
            f"(eqzoo {saved.get('eqzoo', '?')}, escnn {saved.get('escnn', '?')}), this model builds bases {ours} "
            f"(eqzoo {now['eqzoo']}, escnn {now['escnn']}). Loading would give silently wrong "
            "outputs: install the versions the checkpoint was saved with, or rebuild the model with the saved "
            "model_args.")
    structure = expected.get("structure_fingerprint")
    if structure is not None and structure != structure_fingerprint(model):
        args = checkpoint["model_args"]
        raise CheckpointError(
            f"{source}: this model shares its likelihoods or has a head other than the checkpoint's (saved "
            f"share_likelihood={args.get('share_likelihood', 'layer')!r}, head={args.get('head', 'auto')!r}; "
            f"this model: share_likelihood={model.model_args['share_likelihood']!r}, head={model_head(model)!r}). "
            "Loading would give silently different outputs: build it with the saved model_args.")
    ref = model.state_dict()
    for key, t in state_dict.items():
        if key in ref and torch.is_tensor(t) and t.is_floating_point() != ref[key].is_floating_point():
            raise CheckpointError(f"{source}/{WEIGHTS_NAME}: tensor {key!r} is {t.dtype} where the model has "
                                  f"{ref[key].dtype}; eqzoo does not cast weights between integer and float "
                                  "types: save the model again with eqzoo.save_pretrained")


def _adapt_stem(state_dict: dict, model: nn.Module) -> None:
    """timm adapts 4-D stem weights to another ``in_chans``; eqzoo's stems hold steerable weights
    (coefficients ``[d_out * d_in * H, F_out, F_in]``, with F_in = C_in on trivial input fields):
    adapt them the same way along the one input-channel axis that differs (sum for one channel,
    else repeat and rescale by ``C_pretrained / C_in``). The filter is linear in the coefficients,
    so it is adapted alike."""
    first = model.pretrained_cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else (first or ()):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        for attr in ("weight", "weight_breaking"):  # both parts of the filter, alike
            key = f"{name}.{attr}"
            w, target = state_dict.get(key), getattr(module, attr, None)
            in_type = getattr(module, "in_type", None)
            if w is None or target is None or in_type is None or in_type.size != len(in_type):
                continue  # not an eqzoo stem on trivial fields (timm handles plain convs itself)
            dims = [i for i, (a, b) in enumerate(zip(w.shape, target.shape)) if a != b]
            if w.dim() != target.dim() or len(dims) != 1:
                continue
            d = dims[0]
            c_old, c_new = w.shape[d], target.shape[d]
            if c_new == 1:
                w = w.sum(dim=d, keepdim=True)
            else:
                reps = [1] * w.dim()
                reps[d] = -(-c_new // c_old)
                w = w.repeat(*reps).narrow(d, 0, c_new) * (c_old / c_new)
            state_dict[key] = w
            input_size = model.pretrained_cfg.get("input_size") or (c_old, 224, 224)
            model.pretrained_cfg["input_size"] = (c_new, *input_size[1:])
            _logger.info("adapted the stem %s from %d to %d input channels", key, c_old, c_new)


def checkpoint_filter(state_dict: dict, model: nn.Module, checkpoint: dict | None = None,
                      features_only: bool = False, then=None) -> dict:
    """timm ``pretrained_filter_fn`` for pe models (runs after the build, before ``load_state_dict``):
    checks the weights against the model (see :func:`_check_checkpoint`), warns when the classifier
    is re-initialised, adapts a steerable stem to another ``in_chans``; ``then`` is a further filter
    of the model's own."""
    if checkpoint is not None:
        _check_checkpoint(state_dict, model, checkpoint)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    classifier = cfg.get("classifier")
    n_old, n_new = cfg.get("num_classes"), getattr(model, "num_classes", None)
    if not features_only and classifier and n_old is not None and n_new is not None and n_old != n_new:
        _logger.warning("re-initialising the classifier %s: the checkpoint has %d classes, the model %d "
                        "(fine-tuning); every other weight and likelihood is loaded", classifier, n_old, n_new)
    _adapt_stem(state_dict, model)
    if then is not None:
        state_dict = then(state_dict, model)
    return state_dict
