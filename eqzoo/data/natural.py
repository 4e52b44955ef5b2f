"""Natural-image data sets for fine-tuning: torchvision's CIFAR-10/100, STL-10 and ImageFolder trees.

Transforms are timm's: ``resolve_data_config`` from the model (mean/std/interpolation/crop of its
pretrained cfg, ``image_size`` overriding the input size) and ``create_transform`` (training
augmentation when ``augment``). Nothing is downloaded: a missing data set raises
:class:`DataNotFoundError` with the command that gets it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from .mnist import DataNotFoundError, Splits

__all__ = ["check_natural", "natural_num_classes", "build_natural"]

_TV = {"cifar10": ("CIFAR10", "cifar-10-batches-py", 10), "cifar100": ("CIFAR100", "cifar-100-python", 100),
       "stl10": ("STL10", "stl10_binary", 10)}
_DEFAULT_VAL = {"cifar10": 5000, "cifar100": 5000, "stl10": 500, "imagefolder": 0}


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


def check_natural(name: str, root: str) -> None:
    if name == "imagefolder":
        _imagefolder_dirs(root)
        return
    if not (Path(root) / _TV[name][1]).is_dir():
        raise DataNotFoundError(f"{name} not found: expected {Path(root) / _TV[name][1]}. Get it with "
                                f"{_download_hint(name, root)}")


def natural_num_classes(name: str, root: str) -> int:
    if name == "imagefolder":
        return sum(1 for p in _imagefolder_dirs(root)["train"].iterdir() if p.is_dir())
    return _TV[name][2]


def _load(name, root, train: bool, transform):
    from torchvision import datasets

    try:
        if name == "imagefolder":
            dirs = _imagefolder_dirs(root)
            return datasets.ImageFolder(str(dirs["train"] if train else dirs.get("test", dirs.get("val"))),
                                        transform=transform)
        cls = getattr(datasets, _TV[name][0])
        if name == "stl10":
            return cls(root, split="train" if train else "test", download=False, transform=transform)
        return cls(root, train=train, download=False, transform=transform)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataNotFoundError(f"{name} under {root} is missing or corrupt ({e}); get it with "
                                f"{_download_hint(name, root)}") from None


def build_natural(d: dict, model) -> Splits:
    from timm.data import create_transform, resolve_data_config

    args = {"input_size": (3, d["image_size"], d["image_size"])} if d["image_size"] else {}
    dcfg = resolve_data_config(args, model=model)
    train_tf = create_transform(**dcfg, is_training=d["augment"])
    eval_tf = create_transform(**dcfg, is_training=False)
    name, root = d["name"], d["root"]
    train_aug, train_plain = _load(name, root, True, train_tf), _load(name, root, True, eval_tf)
    n = len(train_aug)
    explicit_val = name == "imagefolder" and (Path(root) / "val").is_dir()
    n_val = 0 if explicit_val else (d["val_size"] if d["val_size"] is not None else _DEFAULT_VAL[name])
    n_train = d["train_size"] if d["train_size"] is not None else n - n_val
    if n_train + n_val > n:
        raise ValueError(f"data.train_size + data.val_size = {n_train + n_val} exceeds the {n} training images of {name}")
    perm = np.random.default_rng(d["seed"]).permutation(n)
    # the validation images come out of the training split, with the evaluation transform
    train = Subset(train_aug, perm[:n_train].tolist())
    val = Subset(train_plain, perm[n_train:n_train + n_val].tolist()) if n_val else None
    if explicit_val:
        from torchvision import datasets
        val = datasets.ImageFolder(str(Path(root) / "val"), transform=eval_tf)
    test = _load(name, root, False, eval_tf)
    if d["test_size"] is not None:
        test = Subset(test, np.random.default_rng(d["seed"] + 1).permutation(len(test))[:d["test_size"]].tolist())
    return Splits(train, val, test, natural_num_classes(name, root), 3)
