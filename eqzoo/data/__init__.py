"""Data sets for training and fine-tuning (the ``data`` section of a run config).

=============  ===============================================================  =====  ========
name           what                                                             size   classes
=============  ===============================================================  =====  ========
digits         scikit-learn's 8x8 digits (no download), ``symmetry`` (C4)       16     10
mnist          MNIST, ``symmetry`` (default C1 = none)                          28     10
rotmnist       MNIST, each digit rotated by a random angle (SO2)                28     10
c4mnist        MNIST, random multiples of 90 degrees (C4)                       28     10
d4mnist        MNIST, random rotations by 90 degrees and flips (D4)             28     10
ddmnist        double-digit MNIST, ``symmetry: [left, right]`` ([C1, SO2])      56     100
fewshot_mnist  MNIST, ``train_size / 10`` labels per class (SO2), see fewshot    28     10
fewshot_digits digits, ``train_size / 10`` labels per class (SO2), see fewshot   33     10
cifar10/100    torchvision CIFAR (timm transforms)                              32     10/100
stl10          torchvision STL-10 (timm transforms)                             96     10
imagefolder    ``root/train/<class>/*``, optional ``root/val``, ``root/test``   first  #folders
=============  ===============================================================  =====  ========

(size: the default ``image_size``; an ImageFolder's is its first training image's.) Augmentation
adds no symmetry of its own: the digit sets' transforms are ``symmetry``, and flips of natural
images are ``hflip``/``vflip`` probabilities (default 0).
=============  ===============================================================  =====  ========

:func:`data_info` checks the data files without loading them (so a missing data set is reported
before any model is built) and :func:`build_datasets` builds the splits.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, DataNotFoundError
from .fewshot import FEWSHOT, build_fewshot, check_fewshot_config
from .mnist import (MNIST_FILES, ImageTensorDataset, Splits, build_ddmnist, build_digits,
                    build_mnist, make_ddmnist, make_transformed, mnist_missing_message)
from .natural import build_natural, check_natural, natural_num_classes
from .symmetry import GROUP_HELP, parse_group, sample_elements, transform_images

__all__ = ["DATASETS", "DataNotFoundError", "ImageTensorDataset", "Splits", "build_datasets", "check_data_config",
           "data_info", "make_ddmnist", "make_transformed", "parse_group", "sample_elements", "transform_images"]

# name -> (kind, default symmetry)
DATASETS = {
    "digits": ("digits", "C4"), "mnist": ("mnist", "C1"), "rotmnist": ("mnist", "SO2"),
    "c4mnist": ("mnist", "C4"), "d4mnist": ("mnist", "D4"), "ddmnist": ("ddmnist", ("C1", "SO2")),
    "cifar10": ("natural", None), "cifar100": ("natural", None), "stl10": ("natural", None),
    "imagefolder": ("natural", None), "fewshot_mnist": ("mnist", "SO2"), "fewshot_digits": ("digits", "SO2"),
}


MAX_DDMNIST_BYTES = 4 * 2**30  # DDMNIST's images in memory (the paper's 17,000 at 56x56: 0.2 GB)


def check_data_config(d: dict) -> None:
    """Static checks of a resolved ``data`` section (raises :class:`~eqzoo.errors.ConfigError`)."""
    name = d["name"]
    if name not in DATASETS:
        raise ConfigError(f"config key 'data.name' must be one of {', '.join(DATASETS)}, got {name!r}")
    kind = DATASETS[name][0]
    sym = d["symmetry"]
    if sym is not None:
        if kind == "natural":
            raise ConfigError(f"config key 'data.symmetry' applies to the digit data sets, not to {name}")
        groups = sym if kind == "ddmnist" else [sym]
        if kind == "ddmnist" and (not isinstance(sym, list) or len(sym) != 2):
            raise ConfigError(f"config key 'data.symmetry' for ddmnist must be [left group, right group] "
                              f"(e.g. [C1, SO2]), got {sym!r}; groups: {GROUP_HELP}")
        if kind != "ddmnist" and not isinstance(sym, str):
            raise ConfigError(f"config key 'data.symmetry' for {name} must be one group, got {sym!r}; groups: {GROUP_HELP}")
        for g in groups:
            try:
                parse_group(g)
            except ValueError:
                raise ConfigError(f"config key 'data.symmetry': unknown group {g!r}; accepted: {GROUP_HELP}") from None
    if d["classes"] is not None:
        if kind not in ("digits", "mnist"):
            raise ConfigError(f"config key 'data.classes' applies to digits and the single-digit MNIST sets, not {name}")
        c = d["classes"]
        if not c or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9 for v in c) \
                or len(set(c)) != len(c):
            raise ConfigError(f"config key 'data.classes' must be distinct digits 0..9, got {c!r}")
    if name in FEWSHOT:
        check_fewshot_config(d)
    for flip in ("hflip", "vflip"):
        if d[flip] and kind != "natural":
            raise ConfigError(f"config key 'data.{flip}' applies to natural images; the digit sets' flips are "
                              f"data.symmetry (e.g. D4 or O2), got {d[flip]!r} for {name}")
    if d["resample"] and kind != "ddmnist":
        raise ConfigError(f"config key 'data.resample' applies to ddmnist only, not to {name}")
    if kind == "ddmnist":
        for key in ("train_size", "val_size", "test_size"):
            if d[key] is not None and d[key] % 100:
                raise ConfigError(f"config key 'data.{key}' for ddmnist must be a multiple of 100 (balanced over "
                                  f"the 100 classes), got {d[key]}")
        # the synthetic canvases are built whole, in float32: bound their memory before building
        sizes = [d[k] if d[k] is not None else n for k, n in (("train_size", 10000), ("val_size", 2000),
                                                                ("test_size", 5000))]
        side = d["image_size"] or 56
        if sum(sizes) * side * side * 4 > MAX_DDMNIST_BYTES:
            raise ConfigError(f"config keys 'data.train_size', 'data.val_size', 'data.test_size' ({sizes}) at "
                              f"data.image_size {side} would take {sum(sizes) * side * side * 4 / 2**30:.1f} GiB, "
                              f"above the maximum of {MAX_DDMNIST_BYTES / 2**30:.0f} GiB "
                              "(MAX_DDMNIST_BYTES in eqzoo/data/__init__.py)")


def data_info(d: dict, in_chans: int | None = None) -> dict:
    """``{"num_classes", "in_chans"}`` of a data section; checks that its files exist (raises
    :class:`DataNotFoundError` with the command that gets them) without loading them, and that
    they can be read with the model's ``in_chans`` (default: the data set's own)."""
    kind = DATASETS[d["name"]][0]
    if kind != "natural" and in_chans not in (None, 1):
        raise ConfigError(f"config key 'model_args.in_chans' is {in_chans}, but {d['name']} has grayscale "
                          "images (1 channel)")
    if kind == "digits":
        return {"num_classes": len(d["classes"] or range(10)), "in_chans": 1}
    if kind in ("mnist", "ddmnist"):
        raw = Path(d["root"]) / "MNIST" / "raw"
        if not all((raw / f).is_file() for f in MNIST_FILES):
            raise DataNotFoundError(mnist_missing_message(d["root"]))
        return {"num_classes": 100 if kind == "ddmnist" else len(d["classes"] or range(10)), "in_chans": 1}
    check_natural(d["name"], d["root"], in_chans or 3)
    return {"num_classes": natural_num_classes(d["name"], d["root"]), "in_chans": in_chans or 3}


def build_datasets(d: dict, model=None, in_chans: int | None = None) -> Splits:
    """Train / val / test splits of a resolved ``data`` section (``model`` gives timm's transforms
    for natural images, ``in_chans`` an ImageFolder's channels)."""
    kind, default_sym = DATASETS[d["name"]]
    if d["name"] in FEWSHOT:
        return build_fewshot(d)
    if kind == "digits":
        return build_digits(d)
    if kind == "mnist":
        return build_mnist(d, default_sym)
    if kind == "ddmnist":
        return build_ddmnist(d)
    return build_natural(d, model, in_chans or 3)
