"""CIFAR-style Wide ResNets (WRN-d-k, 32x32 inputs), partially equivariant, as e2cnn's E(2)-WRNs.

WRN-d-k (Zagoruyko & Komodakis, arXiv:1605.07146): a 3x3 stem of 16 channels, three stages of
``(d - 4) / 6`` pre-activation blocks of widths 16k, 32k, 64k (strides 1, 2, 2), a final BN-ReLU,
global average pooling and a linear classifier. ``WideResNet`` is the plain model and
``PEWideResNet`` the same module tree built from eqzoo's layers (widths as whole regular fields, so
for finite groups exactly the plain widths): ``eqzoo.export`` loads a pe WRN into ``WideResNet``
with ``strict=True``. timm has no CIFAR WRN, which is why the plain class lives here.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from timm.layers import DropPath
from timm.models import checkpoint_seq, register_model

from .._timm import feature_take_indices
from ..errors import ModelArgError
from ..validate import check_widths
from ._builder import build_pe_model
from ._common import PEModelBase, check_built_size, checked_model_args
from ._layers import FieldLayers, PlainLayers, factory_kwargs, head_likelihood, install_head, reset_layers
from ._pretrained import published_default_cfgs
from ._schema import register_architectures

__all__ = ["WideResNet", "PEWideResNet", "WideBasicBlock"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3, plus a 1x1 projection
    of the activated input when the shape changes (as the original WRN)."""

    def __init__(self, factory, in_type, out_type, stride: int = 1, block_drop_rate: float = 0.0,
                 drop_path: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = factory.norm(in_type)
        self.act1 = factory.act(in_type)
        self.conv1 = factory.conv(in_type, out_type, 3, stride, 1)
        self.bn2 = factory.norm(out_type)
        self.act2 = factory.act(out_type)
        self.drop = nn.Dropout(block_drop_rate) if block_drop_rate > 0 else nn.Identity()
        self.conv2 = factory.conv(out_type, out_type, 3, 1, 1)
        needs_projection = stride != 1 or factory.channels(in_type) != factory.channels(out_type)
        self.shortcut = factory.conv(in_type, out_type, 1, stride, 0) if needs_projection else None
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return out + shortcut


class WideResNet(PEModelBase):
    """Plain CIFAR WideResNet WRN-``depth``-``widen_factor`` with timm's model interface.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...).
        widen_factor: k.
        num_classes, in_chans, global_pool, drop_rate (before the classifier), drop_path_rate: as timm.
        block_drop_rate: the WRN dropout between the two convolutions of a block.
        channels: (stem, stage1, stage2, stage3) widths; default (16, 16k, 32k, 64k).
        device, dtype: factory kwargs, as timm's models take them.
        factory: the layer factory (default :class:`PlainLayers` with ``device``/``dtype``).
    """

    def __init__(self, depth: int = 16, widen_factor: int = 8, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 block_drop_rate: float = 0.0, channels: Optional[Tuple[int, ...]] = None, factory=None,
                 device=None, dtype=None):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        factory = PlainLayers(device, dtype) if factory is None else factory
        channels = _wrn_widths(depth, widen_factor, channels)
        if len(channels) != 4:
            raise ValueError(f"channels must be 4 widths (stem, stage1, stage2, stage3), got {channels}")
        blocks_per_stage = (depth - 4) // 6
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        factory.begin_stage()
        stem_type = factory.fields(channels[0])
        self.conv1 = factory.conv(factory.input_type(in_chans), stem_type, 3, 1, 1)
        self.feature_info = [dict(num_chs=factory.channels(stem_type), reduction=1, module="conv1")]
        self._types = [stem_type]

        prev_type, block_idx, num_blocks = stem_type, 0, 3 * blocks_per_stage
        for stage_idx, width in enumerate(channels[1:]):
            factory.begin_stage()
            out_type = factory.fields(width)
            stride = 1 if stage_idx == 0 else 2
            blocks = []
            for i in range(blocks_per_stage):
                dpr = drop_path_rate * block_idx / max(num_blocks - 1, 1)  # timm's linear decay rule
                blocks.append(WideBasicBlock(factory, prev_type, out_type, stride if i == 0 else 1,
                                             block_drop_rate, DropPath(dpr) if dpr > 0 else None))
                prev_type = out_type
                block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=factory.channels(out_type), reduction=2**stage_idx,
                                          module=f"layer{stage_idx + 1}"))
            self._types.append(out_type)

        # final pre-activation norm of the last stage (timm's ResNetV2 calls it `norm`)
        self.norm = factory.norm(prev_type)
        self.act = factory.act(prev_type)
        self._out_type = prev_type
        self.num_features = factory.channels(prev_type)
        self._set_head(factory, num_classes, global_pool)  # the factory's sharing picks the likelihood

    # -- timm's model interface ------------------------------------------------------------------------
    def _head_factory(self):
        """The layer factory for a new head and the likelihood it should use (none for plain)."""
        return PlainLayers(**factory_kwargs(self)), None

    @torch.jit.ignore
    def init_weights(self) -> None:
        """Initialise the weights as a new model has them (e.g. after ``to_empty()`` of a model
        built on the meta device)."""
        reset_layers(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        # as timm's ResNetV2: the final pre-activation norm goes with the last blocks
        return dict(stem=r"^conv1", blocks=r"^layer(\d+)" if coarse else [
            (r"^layer(\d+)\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        factory, likelihood = self._head_factory()
        self._set_head(factory, num_classes, global_pool, likelihood)

    def _set_head(self, factory, num_classes: int, global_pool: Optional[str], likelihood=None) -> None:
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        pooled_type = factory.pooled_type(self._out_type, global_pool)
        fc = factory.classifier(pooled_type, num_classes, likelihood)
        install_head(self, fc, num_classes, global_pool, factory.channels(pooled_type))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Features after the stem and each stage (``norm=True`` applies the final BN-ReLU to the last)."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(4, indices)
        intermediates = []
        x = self.conv1(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[:max_index]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.act(self.norm(x)) if norm and feat_idx == 3 else x)
        if intermediates_only:
            return intermediates
        if feat_idx == 3:
            x = self.act(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices, max_index = feature_take_indices(4, indices)
        prune_end = max_index < 3
        for name in ("layer1", "layer2", "layer3")[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so that checkpoint_seq can still iterate it
        if prune_norm or prune_end:
            self.norm, self.act = nn.Identity(), nn.Identity()  # sized for the last stage only
        if prune_end:
            self._out_type = self._types[max_index]
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq([self.layer1, self.layer2, self.layer3], x, flatten=True)
        else:
            x = self.layer3(self.layer2(self.layer1(x)))
        return self.act(self.norm(x))



def _wrn_widths(depth: int, widen_factor: int, channels) -> tuple:
    return tuple(channels or (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor))


def _check_wrn_args(a: dict) -> None:
    """PEWideResNet's cross-key checks and its size (each argument alone is checked by eqzoo.validate.OPTIONS)."""
    depth = a["depth"]
    if (depth - 4) % 6:
        raise ModelArgError("depth", f"must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
    widths = _wrn_widths(depth, a["widen_factor"], a["channels"])
    check_widths(a["group"], widths)
    convs, prev = [(a["in_chans"], widths[0], 3)], widths[0]
    for width in widths[1:]:  # (depth - 4) / 6 blocks of two 3x3 convolutions, one projection
        convs += [(prev, width, 3), (width, width, 3), (prev, width, 1)]
        convs += [(width, width, 3)] * (2 * ((depth - 4) // 6 - 1))
        prev = width
    check_built_size(a, convs, prev)


class PEWideResNet(WideResNet):
    """Partially equivariant WRN: :class:`WideResNet` built from eqzoo's layers.

    Takes :class:`WideResNet`'s arguments and ``group`` (default ``"D4"``), ``bandlimit``,
    ``out_bandlimit``, ``field_bandlimit``, ``share_likelihood`` (``"layer"``, ``"stage"``,
    ``"model"``), ``learn_likelihood``, ``head``, ``basis`` and ``nonlinearity`` as :class:`~eqzoo.models.PEResNet`. ``feature_type`` is
    the escnn FieldType of ``forward_features``' output. Every argument is checked for its type
    and range before anything is built (see :data:`eqzoo.validate.OPTIONS`) and kept as
    ``model.model_args``.
    """

    def __init__(self, depth: int = 16, widen_factor: int = 8, num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 block_drop_rate: float = 0.0, channels: Optional[Tuple[int, ...]] = None,
                 group: str = "D4", bandlimit: Optional[int] = None, out_bandlimit: Optional[int] = -1,
                 field_bandlimit: Optional[int] = None, share_likelihood: str = "layer",
                 learn_likelihood: bool = True, head: str = "auto", basis: str = "auto",
                 nonlinearity: str = "auto", device=None, dtype=None):
        # types, ranges and the size first, before any escnn or tensor work (a plain attribute: it
        # survives WideResNet's nn.Module.__init__ below)
        self.model_args = checked_model_args(self, locals(), _check_wrn_args)
        factory = FieldLayers.from_model_args(self.model_args, device=device, dtype=dtype)
        factory.check_pool(global_pool)
        factory.check_widths(_wrn_widths(depth, widen_factor, channels))
        super().__init__(depth, widen_factor, num_classes, in_chans, global_pool, drop_rate, drop_path_rate,
                         block_drop_rate, channels, factory=factory)
        self.group = factory.group

    def _head_factory(self):
        factory = FieldLayers.for_model(self)
        return factory, head_likelihood(self, factory)

    @property
    def feature_type(self):
        return self._out_type

    @property
    def feature_types(self):
        return list(self._types)

    def plain_counterpart(self) -> Optional[nn.Module]:
        """The plain :class:`WideResNet` with the same widths (finite groups: regular fields are
        permutation fields, so the nn layers compute the same function)."""
        if not self.group.is_finite:
            return None  # O(2)/SO(2) use FourierReLU / average max-pool: not a plain WRN
        a = self.model_args
        return WideResNet(a["depth"], a["widen_factor"], self.num_classes, self.in_chans,
                          self.global_pool.pool_type, self.drop_rate, a["drop_path_rate"],
                          a["block_drop_rate"], tuple(t.size for t in self._types))


def _create_pe_wrn(variant: str, pretrained: bool = False, **kwargs) -> PEWideResNet:
    # four feature levels (stem, three stages), not timm's default five
    return build_pe_model(PEWideResNet, variant, pretrained, feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2406.03946", "origin_url": "https://arxiv.org/abs/2406.03946",
        **kwargs,
    }


default_cfgs = published_default_cfgs({  # + the published tags (_pretrained.py)
    "pe_wrn16_8": _cfg(),
    "pe_wrn28_10": _cfg(),
})
register_architectures(PEWideResNet, *default_cfgs)


@register_model
def pe_wrn16_8(pretrained: bool = False, **kwargs) -> PEWideResNet:
    """Partially equivariant WRN-16-8 for 32x32 inputs (plain counterpart: WideResNet(16, 8))."""
    model_args = dict(depth=16, widen_factor=8)
    return _create_pe_wrn("pe_wrn16_8", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_wrn28_10(pretrained: bool = False, **kwargs) -> PEWideResNet:
    """Partially equivariant WRN-28-10 for 32x32 inputs (plain counterpart: WideResNet(28, 10))."""
    model_args = dict(depth=28, widen_factor=10)
    return _create_pe_wrn("pe_wrn28_10", pretrained, **dict(model_args, **kwargs))
