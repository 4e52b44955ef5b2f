"""Natural-image data sets for fine-tuning: torchvision's CIFAR-10/100, STL-10 and ImageFolder trees.

Transforms are timm's: ``resolve_data_config`` from the model (mean/std/interpolation/crop of its
pretrained cfg) and ``create_transform`` (training augmentation when ``augment``). The input size
is ``image_size``, else the data set's own (32 for CIFAR, 96 for STL-10, an ImageFolder's first
training image), never the model's 224. Flips are a symmetry added to the data, which is what λ
measures: they are off unless ``hflip``/``vflip`` give their probability. An ImageFolder is read
with as many channels as the model takes (1: grayscale, 3: RGB). Nothing is downloaded: a missing
data set raises :class:`DataNotFoundError` with the command that gets it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from ..errors import ConfigError
from .mnist import DataNotFoundError, Splits

__all__ = ["check_natural", "natural_num_classes", "build_natural"]

_TV = {"cifar10": ("CIFAR10", "cifar-10-batches-py", 10), "cifar100": ("CIFAR100", "cifar-100-python", 100),
       "stl10": ("STL10", "stl10_binary", 10)}
_DEFAULT_VAL = {"cifar10": 5000, "cifar100": 5000, "stl10": 500, "imagefolder": 0}
_SIDE = {"cifar10": 32, "cifar100": 32, "stl10": 96}


def _download_hint(name: str, root: str) -> str:
    cls = _TV[name][0]
    split = "split='train'" if name == "stl10" else "train=True"
    return (f"`python -c \"import torchvision; torchvision.datasets.{cls}('{root}', {split}, download=True)\"` "
            f"(or copy the extracted {_TV[name][1]} folder into {root}); or set data.root to where it is")


def _imagefolder_dirs(root: str) -> dict:
    r = Path(root)
    dirs = {s: r / s for s in ("train", "val", "test") if (r / s).is_dir()}
    if "train" not in dirs:
        raise DataNotFoundError(f"imagefolder: expected {r}/train/<class>/<image> (and optionally {r}/val, "
                                f"{r}/test with the same class folders); {r}/train does not exist")
    return dirs


def check_natural(name: str, root: str, in_chans: int = 3) -> None:
    """The data files exist, and hold images of ``in_chans`` channels (raises before anything is built)."""
    if name == "imagefolder":
        _imagefolder_dirs(root)
        if in_chans not in (1, 3):
            raise ConfigError(f"config key 'model_args.in_chans' is {in_chans}: an ImageFolder is read as grayscale "
                              "(in_chans 1) or RGB (in_chans 3)")
        return
    if in_chans != 3:
        raise ConfigError(f"config key 'model_args.in_chans' is {in_chans}, but {name} has RGB images (3 channels)")
    if not (Path(root) / _TV[name][1]).is_dir():
        raise DataNotFoundError(f"{name} not found: expected {Path(root) / _TV[name][1]}. Get it with "
                                f"{_download_hint(name, root)}")


def natural_num_classes(name: str, root: str) -> int:
    if name == "imagefolder":
        return sum(1 for p in _imagefolder_dirs(root)["train"].iterdir() if p.is_dir())
    return _TV[name][2]


def _image_folder(folder, transform, in_chans: int):
    from PIL import Image
    from torchvision import datasets

    mode = "L" if in_chans == 1 else "RGB"

    def load(path):
        with open(path, "rb") as f:
            return Image.open(f).convert(mode)
    return datasets.ImageFolder(str(folder), transform=transform, loader=load)


def _own_side(name: str, root: str) -> int:
    """The data set's own image side: fixed for torchvision's sets, an ImageFolder's first image."""
    if name != "imagefolder":
        return _SIDE[name]
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    train = _imagefolder_dirs(root)["train"]
    first = next((p for p in sorted(train.rglob("*")) if p.suffix.lower() in IMG_EXTENSIONS), None)
    if first is None:
        raise DataNotFoundError(f"imagefolder: no images under {train}")
    with Image.open(first) as im:
        return max(im.size)


def _load(name, root, train: bool, transform, in_chans: int = 3):
    from torchvision import datasets

    try:
        if name == "imagefolder":
            dirs = _imagefolder_dirs(root)
            return _image_folder(dirs["train"] if train else dirs.get("test", dirs.get("val")), transform, in_chans)
        cls = getattr(datasets, _TV[name][0])
        if name == "stl10":
            return cls(root, split="train" if train else "test", download=False, transform=transform)
        return cls(root, train=train, download=False, transform=transform)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataNotFoundError(f"{name} under {root} is missing or corrupt ({e}); get it with "
                                f"{_download_hint(name, root)}") from None


def build_natural(d: dict, model, in_chans: int = 3) -> Splits:
    from timm.data import create_transform, resolve_data_config

    name, root = d["name"], d["root"]
    side = d["image_size"] or _own_side(name, root)
    dcfg = resolve_data_config({"input_size": (in_chans, side, side)}, model=model)
    if len(dcfg["mean"]) != in_chans:  # a grayscale input to a model whose pretrained cfg is RGB
        dcfg.update(mean=(sum(dcfg["mean"]) / len(dcfg["mean"]),) * in_chans,
                    std=(sum(dcfg["std"]) / len(dcfg["std"]),) * in_chans)
    train_tf = create_transform(**dcfg, is_training=d["augment"], hflip=d["hflip"], vflip=d["vflip"])
    eval_tf = create_transform(**dcfg, is_training=False)
    train_aug, train_plain = _load(name, root, True, train_tf, in_chans), _load(name, root, True, eval_tf, in_chans)
    n = len(train_aug)
    explicit_val = name == "imagefolder" and (Path(root) / "val").is_dir()
    n_val = 0 if explicit_val else (d["val_size"] if d["val_size"] is not None else _DEFAULT_VAL[name])
    n_train = d["train_size"] if d["train_size"] is not None else n - n_val
    if n_train + n_val > n:
        raise ConfigError(f"config keys 'data.train_size' + 'data.val_size' = {n_train + n_val} exceed the {n} "
                          f"training images of {name}")
    perm = np.random.default_rng(d["seed"]).permutation(n)
    # the validation images come out of the training split, with the evaluation transform
    train = Subset(train_aug, perm[:n_train].tolist())
    val = Subset(train_plain, perm[n_train:n_train + n_val].tolist()) if n_val else None
    if explicit_val:
        val = _image_folder(Path(root) / "val", eval_tf, in_chans)
    test = _load(name, root, False, eval_tf, in_chans)
    if d["test_size"] is not None:
        test = Subset(test, np.random.default_rng(d["seed"] + 1).permutation(len(test))[:d["test_size"]].tolist())
    names = getattr(train_aug, "classes", None)  # ImageFolder: the folder names; CIFAR, STL-10: theirs
    return Splits(train, val, test, natural_num_classes(name, root), in_chans,
                  tuple(str(c) for c in names) if names is not None else None)
