"""What every pe model family shares: its checked arguments, its size before it is built, the
classifier's forward, and the checks of weights loaded into it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ModelArgError
from ..groups import get_group
from ..kernels import kernel_basis, resolved_basis
from ..validate import check_args, check_size
from ._layers import check_pooled
from ._schema import PINNED_BASES, basis_fingerprint, layer_fingerprints

_NOT_OPTIONS = ("self", "__class__", "device", "dtype")


def checked_model_args(model: nn.Module, arguments: dict, family_check=None) -> dict:
    """The constructor's ``arguments`` (its ``locals()`` on entry) as the model's record
    ``model_args``, each checked by :data:`eqzoo.validate.OPTIONS` and then all together by
    ``family_check`` (cross-key checks and the size), before any escnn or tensor work."""
    where = f"{type(model).__name__}: "
    args = {k: v for k, v in arguments.items() if k not in _NOT_OPTIONS}
    check_args(args, where)
    if family_check is not None:
        try:
            family_check(args)
        except ModelArgError as e:
            raise ModelArgError(e.arg, e.problem, where) from None
    return args


def conv_elements(c_in: int, c_out: int, kernel_size: int, group, basis: str, learnt: bool) -> int:
    """Tensor elements a PEConv2d between these widths builds: its coefficients κ0, κ1 (where λ
    is learnt) and their twirled copy, each with the layer's own number of basis functions per
    channel pair, and the pixel filter."""
    G = get_group(group)
    per_pair = kernel_basis(kernel_size, 1, resolved_basis(basis, G), G).size
    return c_in * c_out * (per_pair * (3 if learnt else 2) + kernel_size * kernel_size)


def check_built_size(args: dict, convs, classifier_in: int) -> None:
    """Refuse a model whose convolutions ``convs`` (``(c_in, c_out, kernel_size)`` each) and
    classifier would build more than the cap of tensor elements (see :func:`eqzoo.validate.check_size`)."""
    learnt = args["learn_likelihood"]
    n = sum(conv_elements(c_in, c_out, k, args["group"], args["basis"], learnt) for c_in, c_out, k in convs)
    check_size(n + classifier_in * args["num_classes"] * (3 if learnt else 2))


def _shared_keys(model: nn.Module) -> list[list[str]]:
    """State_dict keys that name one tensor (a likelihood shared by several layers)."""
    by_tensor: dict[int, list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(key)
    return [keys for keys in by_tensor.values() if len(keys) > 1]


def check_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Refuse weights that would load silently wrong: a non-finite tensor, or different values
    under keys this model shares (weights saved with another ``share_likelihood``). Raises a
    one-line :class:`CheckpointError` naming the keys."""
    for key, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"tensor {key!r} holds NaN or infinite values; refusing to load it")
    for keys in _shared_keys(model):
        given = [k for k in keys if k in state_dict]
        for k in given[1:]:
            if not torch.equal(state_dict[k], state_dict[given[0]]):
                raise CheckpointError(
                    f"tensors {given[0]!r} and {k!r} differ, but this model shares one parameter between them "
                    f"(share_likelihood={getattr(model, 'model_args', {}).get('share_likelihood')!r}): the weights "
                    "were saved with another sharing; build the model with the sharing they were saved with")


def _load_error(model: nn.Module, error: RuntimeError) -> CheckpointError:
    """torch's multi-line load_state_dict error as one line: its first problem and how many there are."""
    details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    first = details[0] if details else str(error)
    if len(first) > 300:
        first = first[:300] + " ..."
    more = f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""
    return CheckpointError(f"the weights do not fit this {type(model).__name__}: {first}{more}; they are for "
                           "another architecture, group, basis or widths (plain timm weights load into "
                           "eqzoo.export's model, not a pe one)")


class PEModelBase(nn.Module):
    """The classifier's forward, checked weight loading, and the record timm's own save writes,
    for every eqzoo model family."""

    __jit_unused_properties__ = ["_model_args"]  # TorchScript: a record for saving, not part of the forward

    @property
    def _model_args(self) -> dict:
        """timm's record of the create_model kwargs (``timm.models.save_for_hf`` writes it as
        config.json's model_args), with the fingerprint of the bases as built now: a folder saved by
        timm then loads back with its bases checked, as one saved by eqzoo.save_pretrained does."""
        args = dict(self.__dict__.get("_timm_model_args", {}))
        if layer_fingerprints(self):  # a plain WideResNet has no bases to pin
            args[PINNED_BASES] = basis_fingerprint(self)
        return args

    @_model_args.setter
    def _model_args(self, value: dict) -> None:
        self.__dict__["_timm_model_args"] = {k: v for k, v in value.items() if k != PINNED_BASES}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # defined here, next to forward_head: FX tracing wraps the leaf function check_pooled in the
        # module of the traced forward
        return self.forward_head(self.forward_features(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        if pre_logits:
            return x
        check_pooled(x, self.num_classes > 0)
        return self.fc(x)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after :func:`check_state_dict`: timm's pretrained loading,
        ``checkpoint_path=`` and direct calls all pass here."""
        check_state_dict(self, state_dict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as e:
            if "Error(s) in loading state_dict" not in str(e):
                raise
            raise _load_error(self, e) from None


_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "label_names")


def set_data_config(model: nn.Module, data_config: dict | None = None, **values) -> dict:
    """Make ``model.pretrained_cfg`` describe the data the model was trained on (what a saved
    config.json and card then say): ``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``, ``crop_mode`` (as timm's ``resolve_data_config`` gives them) and ``label_names``,
    from ``data_config`` and then ``values``. Whatever is not given is fitted to the model's input
    channels (a 3-channel mean becomes its average for 1 channel, as timm's loaders use it).
    Returns the new pretrained_cfg."""
    given = {k: v for k, v in dict(data_config or {}, **values).items() if k in _DATA_KEYS and v is not None}
    unknown = set(values) - set(_DATA_KEYS)
    if unknown:
        raise ValueError(f"set_data_config: unknown keys {sorted(unknown)}; accepted: {', '.join(_DATA_KEYS)}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {}, **given)
    channels = int(getattr(model, "in_chans", 0) or (cfg.get("input_size") or (3,))[0])
    if cfg.get("input_size") and cfg["input_size"][0] != channels:
        cfg["input_size"] = (channels, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is not None and len(value) not in (1, channels):
            cfg[key] = tuple([sum(value) / len(value)] * channels)
    for key in ("test_input_size", "min_input_size"):
        if cfg.get(key) and "input_size" in given:
            cfg.pop(key)  # the registry's recommendation for another input
    if "label_names" in given and len(given["label_names"]) != getattr(model, "num_classes", len(given["label_names"])):
        raise ValueError(f"set_data_config: {len(given['label_names'])} label names for {model.num_classes} classes")
    if "label_names" in given:  # the names are of this head's classes (timm's save drops them otherwise)
        cfg["num_classes"] = len(given["label_names"])
    current = getattr(model, "pretrained_cfg", None)
    if isinstance(current, dict):  # in place: timm's default_cfg is the same dict
        current.clear()
        current.update(cfg)
        return current
    model.pretrained_cfg = cfg
    return cfg
