"""Partially equivariant ResNets, ImageNet-style, in timm's ResNet layout.

``PEResNet`` is timm's ``ResNet`` with every convolution a :class:`~eqzoo.nn.PEConv2d`, every
batch norm a :class:`~eqzoo.nn.FieldBatchNorm2d` and the classifier a :class:`~eqzoo.nn.PELinear`
from the last fields to trivial class logits. It keeps timm's module names (``conv1, bn1, act1,
maxpool, layer1..layer4, global_pool, fc``, blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]/downsample``),
so ``eqzoo.export(model)`` loads into ``timm.create_model('resnet18')`` etc. with ``strict=True``,
and it subclasses ``ResNet`` for timm's forward_features / forward_head / forward_intermediates /
grad checkpointing / group_matcher.

Widths are timm's, as whole regular fields of the group (|G| channels each; e.g. width 64 with D4 is
8 fields), so a pe model costs the compute of its timm counterpart. For O(2)/SO(2) each width is
rounded to the nearest whole band-limited field. The input is ``in_chans`` trivial fields.

Paper: Veefkind & Cesa, "A Probabilistic Approach to Learning the Degree of Equivariance in
Steerable CNNs", ICML 2024 (arXiv:2406.03946). ResNet: He et al., arXiv:1512.03385.
"""
from __future__ import annotations

from typing import Optional

import timm
import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import ResNet, register_model

from .._timm import feature_take_indices
from ..errors import ModelArgError
from ..validate import check_widths
from ._builder import build_pe_model
from ._common import PEModelBase, check_built_size, checked_model_args
from ._layers import FieldLayers, head_likelihood, install_head, reset_layers
from ._pretrained import published_default_cfgs
from ._schema import register_architectures

__all__ = ["PEResNet", "PEBasicBlock", "PEBottleneck"]


class PEBasicBlock(nn.Module):
    """timm's BasicBlock (two 3x3 convolutions) on fields."""

    expansion = 1

    def __init__(self, factory: FieldLayers, in_type, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, base_width: int = 64,
                 drop_path: Optional[nn.Module] = None):
        super().__init__()
        if base_width != 64:
            raise ValueError(f"PEBasicBlock supports only base_width=64 (as timm's BasicBlock), got {base_width}")
        mid_type = factory.fields(planes)
        out_type = factory.fields(planes * self.expansion)
        self.conv1 = factory.conv(in_type, mid_type, 3, stride, 1)
        self.bn1 = factory.norm(mid_type)
        self.act1 = factory.act(mid_type)
        self.conv2 = factory.conv(mid_type, out_type, 3, 1, 1)
        self.bn2 = factory.norm(out_type)
        self.act2 = factory.act(out_type)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut  # in place, as timm's blocks: x is the batch norm's output, which its backward does not need
        return self.act2(x)


class PEBottleneck(nn.Module):
    """timm's Bottleneck (1x1, 3x3 with the stride, 1x1 expanding 4x) on fields."""

    expansion = 4

    def __init__(self, factory: FieldLayers, in_type, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, base_width: int = 64,
                 drop_path: Optional[nn.Module] = None):
        super().__init__()
        mid_type = factory.fields(int(planes * base_width / 64))
        out_type = factory.fields(planes * self.expansion)
        self.conv1 = factory.conv(in_type, mid_type, 1)
        self.bn1 = factory.norm(mid_type)
        self.act1 = factory.act(mid_type)
        self.conv2 = factory.conv(mid_type, mid_type, 3, stride, 1)
        self.bn2 = factory.norm(mid_type)
        self.act2 = factory.act(mid_type)
        self.conv3 = factory.conv(mid_type, out_type, 1)
        self.bn3 = factory.norm(out_type)
        self.act3 = factory.act(out_type)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut  # (in place: see PEBasicBlock)
        return self.act3(x)


_BLOCKS = {"basic": PEBasicBlock, "bottleneck": PEBottleneck}


def _resnet_convs(block, layers, channels, stem_width, base_width, in_chans):
    """``(c_in, c_out, kernel_size)`` of every convolution of the ResNet with these widths."""
    convs, prev = [(in_chans, stem_width, 7)], stem_width
    for stage_idx, (planes, num_blocks) in enumerate(zip(channels, layers)):
        out, mid = planes * block.expansion, int(planes * base_width / 64)
        for i in range(num_blocks):
            c_in = prev if i == 0 else out
            if block.expansion == 1:
                convs += [(c_in, planes, 3), (planes, planes, 3)]
            else:
                convs += [(c_in, mid, 1), (mid, mid, 3), (mid, out, 1)]
        if stage_idx or prev != out:
            convs.append((prev, out, 1))  # the downsample projection
        prev = out
    return convs, prev


def _check_resnet_args(a: dict) -> None:
    """PEResNet's cross-key checks and its size (each argument alone is checked by eqzoo.validate.OPTIONS)."""
    if a["channels"] is None:
        raise ModelArgError("channels", "must be a list of 4 widths, got None")
    block, channels = _BLOCKS.get(a["block"], a["block"]), a["channels"]
    mids = [int(c * a["base_width"] / 64) for c in channels]
    if block.expansion != 1 and min(mids) < 1:
        raise ModelArgError("base_width", f"={a['base_width']} gives bottleneck widths {mids}: every width must be >= 1")
    check_widths(a["group"], [a["stem_width"]] + [c * block.expansion for c in channels]
                 + (mids if block.expansion != 1 else []))
    convs, features = _resnet_convs(block, a["layers"], channels, a["stem_width"], a["base_width"], a["in_chans"])
    check_built_size(a, convs, features)


# timm's ResNets by (block expansion, layers, base_width): the plain counterpart of a pe ResNet
_TIMM_RESNETS = {(1, (2, 2, 2, 2), 64): "resnet18", (1, (3, 4, 6, 3), 64): "resnet34",
                 (4, (3, 4, 6, 3), 64): "resnet50", (4, (3, 4, 23, 3), 64): "resnet101",
                 (4, (3, 4, 6, 3), 128): "wide_resnet50_2", (4, (3, 4, 23, 3), 128): "wide_resnet101_2"}


class PEResNet(PEModelBase, ResNet):
    """A partially equivariant ResNet with timm's layout (7x7 stem, max-pool, four stages).

    Every argument is checked for its type and range before anything is built (see
    :data:`eqzoo.validate.OPTIONS`: caps on the group's order, widths, depths, and the size of
    what the model builds), and all of them are kept as ``model.model_args``: what a new head,
    the plain counterpart and a saved config.json are made from.

    Args:
        block: :class:`PEBasicBlock` or :class:`PEBottleneck` (or ``"basic"`` / ``"bottleneck"``).
        layers: number of blocks per stage.
        num_classes, in_chans, global_pool, drop_rate, drop_path_rate: as timm's ResNet.
            ``global_pool`` must be channel-wise for the fields: ``avg``, ``max``, ``avgmax``,
            ``catavgmax`` for finite groups, ``avg`` for O(2)/SO(2) (``''`` only with no classifier).
        base_width, stem_width, channels: widths in channels, as timm's ResNet.
        zero_init_last: zero the last norm's weight of every residual branch (off by default,
            unlike timm's ResNet: the pe models train worse with it; see the README).
        group, bandlimit, out_bandlimit, field_bandlimit, share_likelihood, learn_likelihood, head,
            basis, nonlinearity: the pe options, shared by every family; their values and meaning
            are declared once, in :data:`eqzoo.validate.OPTIONS` (``doc`` of each).
        device, dtype: factory kwargs, as timm's models take them (``device='meta'`` builds without
            memory; then ``to_empty()`` and :meth:`init_weights`, or ``load_state_dict``).
    """

    def __init__(
            self,
            block=PEBasicBlock,
            layers=(2, 2, 2, 2),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            base_width: int = 64,
            stem_width: int = 64,
            channels=(64, 128, 256, 512),
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            drop_block_rate: float = 0.0,
            zero_init_last: bool = False,
            group: str = "D4",
            bandlimit: Optional[int] = None,
            out_bandlimit: Optional[int] = -1,
            field_bandlimit: Optional[int] = None,
            share_likelihood: str = "layer",
            learn_likelihood: bool = True,
            head: str = "auto",
            basis: str = "auto",
            nonlinearity: str = "auto",
            device=None,
            dtype=None,
    ):
        nn.Module.__init__(self)  # timm's ResNet.__init__ builds nn.Conv2d layers: not called
        # types, ranges and the size first, before any escnn or tensor work
        self.model_args = checked_model_args(self, locals(), _check_resnet_args)
        block = _BLOCKS.get(block, block)
        if drop_block_rate:
            raise ValueError("drop_block_rate is not supported by pe models (DropBlock masks channels "
                             "independently, which breaks the fields); use drop_path_rate")
        factory = FieldLayers.from_model_args(self.model_args, device=device, dtype=dtype)
        self.group = factory.group
        factory.check_pool(global_pool)
        factory.check_widths([stem_width] + [c * block.expansion for c in channels]
                             + [int(c * base_width / 64) for c in channels])
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        # Stem: in_chans trivial fields -> regular fields (its own "stage" for likelihood sharing)
        factory.begin_stage()
        in_type = factory.input_type(in_chans)
        stem_type = factory.fields(stem_width)
        self.conv1 = factory.conv(in_type, stem_type, 7, stride=2, padding=3)
        self.bn1 = factory.norm(stem_type)
        self.act1 = factory.act(stem_type)
        self.maxpool = factory.max_pool(stem_type, 3, 2, 1)
        self.feature_info = [dict(num_chs=stem_type.size, reduction=2, module="act1")]
        self.feature_types = [stem_type]  # escnn FieldType of each feature_info entry

        # Stages
        prev_type, net_block_idx, net_num_blocks = stem_type, 0, sum(layers)
        for stage_idx, (planes, num_blocks) in enumerate(zip(channels, layers)):
            factory.begin_stage()
            stride = 1 if stage_idx == 0 else 2
            out_type = factory.fields(planes * block.expansion)
            downsample = None
            if stride != 1 or prev_type.size != out_type.size:
                downsample = nn.Sequential(factory.conv(prev_type, out_type, 1, stride), factory.norm(out_type))
            blocks = []
            for block_idx in range(num_blocks):
                # stochastic depth, timm's linear decay rule
                dpr = drop_path_rate * net_block_idx / max(net_num_blocks - 1, 1)
                blocks.append(block(factory, prev_type, planes, stride if block_idx == 0 else 1,
                                    downsample if block_idx == 0 else None, base_width,
                                    DropPath(dpr) if dpr > 0 else None))
                prev_type = out_type
                net_block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_type.size, reduction=4 * 2**stage_idx,
                                          module=f"layer{stage_idx + 1}"))
            self.feature_types.append(out_type)

        # Head
        self.feature_type = prev_type
        self.num_features = prev_type.size
        self._set_head(factory, num_classes, global_pool)
        # every layer initialised itself (PEConv2d: He variance at uniform λ); timm's zero-init remains
        self.init_weights(zero_init_last=zero_init_last, needs_reset=False)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: Optional[bool] = None, needs_reset: bool = True) -> None:
        """Initialise the weights as a new model has them (e.g. after ``to_empty()`` of a model built
        on the meta device); ``zero_init_last`` defaults to the constructor's."""
        if zero_init_last is None:
            zero_init_last = self.model_args["zero_init_last"]
        if needs_reset:
            reset_layers(self)
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier of kind ``head`` (see :meth:`FieldLayers.classifier`). A learnt head's
        likelihood is a fresh one with ``share_likelihood="layer"``, else the last stage's / the model's."""
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._set_head(FieldLayers.for_model(self), num_classes, global_pool)

    def _set_head(self, factory: FieldLayers, num_classes: int, global_pool: str) -> None:
        pooled_type = factory.pooled_type(self.feature_type, global_pool)
        likelihood = None
        if num_classes > 0 and factory.head == "learnt":
            likelihood = head_likelihood(self, factory)
        fc = factory.classifier(pooled_type, num_classes, likelihood)
        install_head(self, fc, num_classes, global_pool, pooled_type.size)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        _, max_index = feature_take_indices(5, indices)
        self.feature_type = self.feature_types[max_index]
        return super().prune_intermediate_layers(indices, prune_norm, prune_head)

    def plain_counterpart(self) -> Optional[nn.Module]:
        """timm's own model with this architecture and widths (only for finite groups, whose regular
        fields give exactly timm's widths), untrained: :func:`eqzoo.export` loads into it."""
        a = self.model_args
        if not self.group.is_finite or a["stem_width"] != 64:
            return None
        block = _BLOCKS.get(a["block"], a["block"])
        name = _TIMM_RESNETS.get((block.expansion, tuple(a["layers"]), a["base_width"]))
        if name is None:  # timm's family model, given these layers and widths as arguments
            name = "resnet18" if block.expansion == 1 else "resnet50"
        return timm.create_model(name, num_classes=self.num_classes, in_chans=self.in_chans,
                                 global_pool=self.global_pool.pool_type, drop_rate=self.drop_rate,
                                 drop_path_rate=a["drop_path_rate"], channels=tuple(a["channels"]),
                                 base_width=a["base_width"], layers=tuple(a["layers"]))


def _create_pe_resnet(variant: str, pretrained: bool = False, **kwargs) -> PEResNet:
    return build_pe_model(PEResNet, variant, pretrained, **kwargs)


def _cfg(**kwargs):
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1", "classifier": "fc", "license": "apache-2.0",
        "paper_ids": "arXiv:2406.03946", "origin_url": "https://arxiv.org/abs/2406.03946",
        **kwargs,
    }


default_cfgs = published_default_cfgs({  # + the published tags (_pretrained.py)
    "pe_resnet18": _cfg(),
    "pe_resnet34": _cfg(),
    "pe_resnet50": _cfg(),
    "pe_resnet101": _cfg(),
    "pe_wide_resnet50_2": _cfg(),
    "pe_wide_resnet101_2": _cfg(),
})
register_architectures(PEResNet, *default_cfgs)


@register_model
def pe_resnet18(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant ResNet-18 (timm counterpart: resnet18)."""
    model_args = dict(block=PEBasicBlock, layers=(2, 2, 2, 2))
    return _create_pe_resnet("pe_resnet18", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_resnet34(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant ResNet-34 (timm counterpart: resnet34)."""
    model_args = dict(block=PEBasicBlock, layers=(3, 4, 6, 3))
    return _create_pe_resnet("pe_resnet34", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_resnet50(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant ResNet-50 (timm counterpart: resnet50)."""
    model_args = dict(block=PEBottleneck, layers=(3, 4, 6, 3))
    return _create_pe_resnet("pe_resnet50", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_resnet101(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant ResNet-101 (timm counterpart: resnet101)."""
    model_args = dict(block=PEBottleneck, layers=(3, 4, 23, 3))
    return _create_pe_resnet("pe_resnet101", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_wide_resnet50_2(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant Wide ResNet-50-2 (timm counterpart: wide_resnet50_2)."""
    model_args = dict(block=PEBottleneck, layers=(3, 4, 6, 3), base_width=128)
    return _create_pe_resnet("pe_wide_resnet50_2", pretrained, **dict(model_args, **kwargs))


@register_model
def pe_wide_resnet101_2(pretrained: bool = False, **kwargs) -> PEResNet:
    """Partially equivariant Wide ResNet-101-2 (timm counterpart: wide_resnet101_2)."""
    model_args = dict(block=PEBottleneck, layers=(3, 4, 23, 3), base_width=128)
    return _create_pe_resnet("pe_wide_resnet101_2", pretrained, **dict(model_args, **kwargs))
