"""Layer factories shared by the model families.

A model is written once against a small factory interface (``fields``, ``conv``, ``norm``,
``act``, ``max_pool``, ``classifier``). :class:`FieldLayers` builds the partially equivariant
version: widths become escnn field types and every convolution gets the likelihood its sharing
mode asks for. :class:`PlainLayers` builds the same module tree from ``torch.nn`` layers; it is the
plain counterpart an exported model loads into when timm has none (the CIFAR WideResNets).
"""
from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from ..groups import get_group
from ..likelihood import GroupLikelihood
from ..nn import FieldBatchNorm2d, PEConv2d, PELinear, field_max_pool, field_relu
from ..errors import ModelArgError
from ..validate import check_arg, check_widths, options_where

# Global pools of timm's SelectAdaptivePool2d that act channel by channel (so they commute with
# permutations of the channels inside regular fields) and how many copies of the fields they emit.
_FINITE_POOLS = {"avg": 1, "max": 1, "avgmax": 1, "catavgmax": 2, "": 1}
# Fields of O(2)/SO(2) are Fourier coefficients: only averaging is linear, hence equivariant.
_CONTINUOUS_POOLS = {"avg": 1, "": 1}


def resolved_head(head: str, learn_likelihood: bool) -> str:
    """The classifier kind ``head`` means: ``"auto"`` is a plain head for learnt-λ models and an
    invariant one for strict models."""
    if head == "auto":
        return "plain" if learn_likelihood else "invariant"
    return head


class PlainLayers:
    """``torch.nn`` layers; a "type" is just a channel count. ``device``/``dtype``: factory kwargs."""

    def __init__(self, device=None, dtype=None):
        self.dd = dict(device=device, dtype=dtype)

    def fields(self, channels: int) -> int:
        return int(channels)

    def input_type(self, in_chans: int) -> int:
        return int(in_chans)

    @staticmethod
    def channels(type_) -> int:
        return int(type_)

    def begin_stage(self) -> None:
        pass

    def conv(self, in_type, out_type, kernel_size, stride=1, padding=0) -> nn.Module:
        return nn.Conv2d(in_type, out_type, kernel_size, stride, padding, bias=False, **self.dd)

    def norm(self, type_) -> nn.Module:
        return nn.BatchNorm2d(type_, **self.dd)

    def act(self, type_, inplace: bool = True) -> nn.Module:
        return nn.ReLU(inplace=inplace)

    def max_pool(self, type_, kernel_size, stride, padding) -> nn.Module:
        return nn.MaxPool2d(kernel_size, stride, padding)

    def pooled_type(self, type_, pool_type: str):
        return type_ * SelectAdaptivePool2d(pool_type=pool_type).feat_mult()

    def classifier(self, in_type, num_classes: int, likelihood=None) -> nn.Module:
        return nn.Linear(in_type, num_classes, **self.dd) if num_classes > 0 else nn.Identity()


class FieldLayers:
    """Partially equivariant layers over one group.

    Args:
        group: group spec (``"D4"``, ``"C8"``, ``"O2"``, ...).
        field_bandlimit: band-limit of the regular-like fields of O(2)/SO(2) (ignored for finite groups).
        bandlimit, out_bandlimit: band-limits of every likelihood (see :class:`~eqzoo.GroupLikelihood`).
        learn_likelihood: ``False`` freezes every likelihood at uniform: the strict steerable model.
        share_likelihood: ``"layer"`` (one likelihood per convolution), ``"stage"`` (one per stage,
            shared by its layers) or ``"model"`` (one for the whole model).
        head: the classifier, see :meth:`classifier`; ``"auto"``: ``"plain"`` with learnt
            likelihoods, ``"invariant"`` for the strict model.
        basis: the kernel basis of the convolutions, see :data:`eqzoo.kernels.BASES`.
        nonlinearity: the nonlinearity of O(2)/SO(2) fields, see :data:`eqzoo.nn.NONLINEARITIES`
            (finite groups: ``"auto"``, the channel-wise ReLU).
        device, dtype: factory kwargs of every layer (timm passes them to model constructors).
    """

    # the model options that configure the factory (a pe model passes them on unchanged)
    ARGS = options_where(layer=True)

    @classmethod
    def from_model_args(cls, model_args: dict, device=None, dtype=None) -> "FieldLayers":
        """The factory a pe model's arguments ask for (the keys in :data:`ARGS`)."""
        return cls(**{k: model_args[k] for k in cls.ARGS}, device=device, dtype=dtype)

    @classmethod
    def for_model(cls, model: nn.Module) -> "FieldLayers":
        """The factory of a built pe model, on its device and dtype: for layers added later, such
        as a new classifier."""
        return cls.from_model_args(model.model_args, **factory_kwargs(model))

    def __init__(self, group="D4", field_bandlimit=None, bandlimit=None, out_bandlimit=-1,
                 learn_likelihood: bool = True, share_likelihood: str = "layer", head: str = "auto",
                 basis: str = "auto", nonlinearity: str = "auto", device=None, dtype=None):
        for name in self.ARGS:
            check_arg(name, locals()[name])
        self.dd = dict(device=device, dtype=dtype)
        self.head = resolved_head(head, learn_likelihood)
        self.basis = basis
        self.group = get_group(group)
        if self.group.is_finite and nonlinearity != "auto":
            raise ModelArgError("nonlinearity", f"{nonlinearity!r} is for the band-limited fields of O(2)/SO(2); "
                                "the regular fields of finite groups take the channel-wise ReLU: use 'auto'")
        self.nonlinearity = nonlinearity
        self.field_bandlimit = field_bandlimit
        self.bandlimit, self.out_bandlimit = bandlimit, out_bandlimit
        self.learn_likelihood = learn_likelihood
        self.share_likelihood = share_likelihood
        self.new_likelihood()  # validates the band-limits now, with GroupLikelihood's message
        self._model_likelihood = self.new_likelihood() if share_likelihood == "model" else None
        self._stage_likelihood = None

    # -- widths -> field types ---------------------------------------------------------------------
    @property
    def field_size(self) -> int:
        return self.group.field_size(self.field_bandlimit)

    def check_widths(self, widths) -> None:
        """Finite groups: every width must be a whole number of regular fields (|G| channels)."""
        check_widths(self.group, widths)

    def fields(self, channels: int):
        """The field type closest to ``channels`` channels: exactly ``channels / |G|`` regular fields
        for finite groups, the nearest whole number of band-limited fields for O(2)/SO(2)."""
        size = self.field_size
        if self.group.is_finite:
            if channels % size:
                self.check_widths([channels])
            n = channels // size
        else:
            n = max(1, round(channels / size))
        return self.group.field_type(n, self.field_bandlimit)

    def input_type(self, in_chans: int):
        return self.group.trivial_type(in_chans)

    @staticmethod
    def channels(type_) -> int:
        return type_.size

    # -- likelihood sharing --------------------------------------------------------------------------
    def new_likelihood(self) -> GroupLikelihood:
        return GroupLikelihood(self.group, bandlimit=self.bandlimit, out_bandlimit=self.out_bandlimit,
                               learnable=self.learn_likelihood, **self.dd)

    def begin_stage(self) -> None:
        """Start a new stage: with ``share_likelihood="stage"`` its layers share a fresh likelihood."""
        if self.share_likelihood == "stage":
            self._stage_likelihood = self.new_likelihood()

    def likelihood(self) -> GroupLikelihood:
        if self.share_likelihood == "model":
            lam = self._model_likelihood
        elif self.share_likelihood == "stage":
            if self._stage_likelihood is None:
                self.begin_stage()
            lam = self._stage_likelihood
        else:
            lam = self.new_likelihood()
        return lam

    # -- layers ----------------------------------------------------------------------------------------
    def conv(self, in_type, out_type, kernel_size, stride=1, padding=0) -> PEConv2d:
        return PEConv2d(in_type, out_type, kernel_size, stride, padding, bias=False, likelihood=self.likelihood(),
                        basis=self.basis, **self.dd)

    def norm(self, type_) -> nn.Module:
        return FieldBatchNorm2d(type_, **self.dd)

    def act(self, type_, inplace: bool = True) -> nn.Module:
        return field_relu(type_, self.nonlinearity, inplace=inplace, **self.dd)

    def max_pool(self, type_, kernel_size, stride, padding) -> nn.Module:
        return field_max_pool(type_, kernel_size, stride, padding)

    def check_pool(self, pool_type: str) -> int:
        """How many copies of the fields timm's global pool ``pool_type`` emits (``catavgmax``: 2);
        ValueError for pools that are not equivariant for these fields."""
        pools = _FINITE_POOLS if self.group.is_finite else _CONTINUOUS_POOLS
        if pool_type not in pools:
            raise ValueError(f"global_pool {pool_type!r} is not equivariant for {self.group.spec} fields; "
                             f"accepted: {sorted(pools)}")
        return pools[pool_type]

    def pooled_type(self, type_, pool_type: str):
        """The field type after timm's global pool ``pool_type``."""
        return self.group.field_type(len(type_) * self.check_pool(pool_type), self.field_bandlimit)

    def classifier(self, in_type, num_classes: int, likelihood: GroupLikelihood | None = None) -> nn.Module:
        """The classifier from the pooled fields to ``num_classes`` logits, by ``head``:

        - ``"plain"``: an ``nn.Linear`` over all pooled channels, free to tell a digit from its
          rotated or mirrored copy (a regular field pools to |G| numbers, one per orientation);
        - ``"learnt"``: a PELinear to trivial fields with a learnt λ (``likelihood``, or one by
          the sharing mode when None): invariant at uniform λ;
        - ``"invariant"``: a PELinear with a frozen uniform λ: the logits are invariant, and
          the head has rank #fields (each field contributes only its mean over the group).
        """
        if num_classes <= 0:
            return nn.Identity()
        if self.head == "plain":
            return nn.Linear(in_type.size, num_classes, **self.dd)
        if self.head == "invariant":
            likelihood = GroupLikelihood(self.group, bandlimit=self.bandlimit, out_bandlimit=self.out_bandlimit,
                                         learnable=False, **self.dd)
        elif likelihood is None:
            likelihood = self.likelihood()
        return PELinear(in_type, self.group.trivial_type(num_classes), likelihood=likelihood, **self.dd)


def head_likelihood(model: nn.Module, factory: FieldLayers) -> GroupLikelihood:
    """The likelihood a new classifier of ``model`` should use: a fresh one per layer, else the one
    of the model's last convolution (the last stage's, or the model's single one)."""
    if factory.share_likelihood == "layer":
        return factory.new_likelihood()
    last = None
    for m in model.modules():
        if isinstance(m, PEConv2d):
            last = m.likelihood
    return last if last is not None else factory.new_likelihood()


def factory_kwargs(model: nn.Module) -> dict:
    """``device``/``dtype`` of a built model's parameters, for layers added to it later (a new
    head); empty before it has any (the layers then follow the factory kwargs or defaults)."""
    ref = next(model.parameters(), None)
    return {} if ref is None else dict(device=ref.device, dtype=ref.dtype)


def reset_layers(model: nn.Module) -> None:
    """Initialise every layer as a fresh model has it, e.g. after ``to_empty()`` of a model built
    on the meta device: ``init_non_persistent_buffers()`` and ``reset_parameters()`` of every
    module that has them (each module once, however often it is shared)."""
    for m in model.modules():
        if hasattr(m, "init_non_persistent_buffers"):
            m.init_non_persistent_buffers()
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def check_pooled(x: torch.Tensor, has_classifier: bool) -> None:
    """A clear error for a classifier on unpooled features: with ``global_pool=''`` the head gives
    ``[B, C, H, W]`` features, which only ``num_classes=0`` (no classifier) passes on. A leaf
    function for FX (registered with timm in ``eqzoo.models``): it branches on the input."""
    if has_classifier and x.dim() != 2:
        raise ValueError("global_pool='' leaves the features unpooled ([B, C, H, W]) and the classifier needs "
                         "pooled ones: reset_classifier(num_classes, 'avg'), or num_classes=0 for the features")


def install_head(model: nn.Module, fc: nn.Module, num_classes: int, global_pool: str, hidden_size: int) -> None:
    """Put a new pooling + classifier on ``model`` (timm's attribute names), on the model's device
    and dtype and in its train/eval mode."""
    fc = fc.to(**factory_kwargs(model))
    model.num_classes = num_classes
    model.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
    model.fc = fc
    model.head_hidden_size = hidden_size
    model.global_pool.train(model.training)
    model.fc.train(model.training)
