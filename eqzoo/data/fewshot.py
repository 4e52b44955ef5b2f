"""Few-label digit tasks: a fixed number of labelled images per class, for fine-tuning benchmarks.

- ``fewshot_mnist``: MNIST. The training images are ``train_size / 10`` of each digit drawn from
  MNIST's training split (and ``val_size / 10`` more for validation); the test images are MNIST's
  test split (the first ``test_size`` of a seeded order, default all 10,000).
- ``fewshot_digits``: scikit-learn's 8x8 digits (other writers than MNIST's, no download),
  upsampled to ``image_size`` (default 33). Training and validation images are drawn per class
  as above; the test images are the remaining ones (or the first ``test_size`` of them).

Each image is transformed by its own element of ``symmetry`` (default SO2: any angle), drawn once
from ``data.seed`` as in :mod:`eqzoo.data.mnist`, so that runs with the same data seed (a model
trained from scratch and a fine-tuned one) see the same labelled images. Balanced draws are
why ``train_size`` and ``val_size`` must be multiples of the class count.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .mnist import ImageTensorDataset, Splits, load_digits_arrays, load_mnist_arrays, make_transformed

__all__ = ["FEWSHOT", "check_fewshot_config", "build_fewshot", "per_class_indices"]

# name -> (image source, default image size)
FEWSHOT = {"fewshot_mnist": ("mnist", 28), "fewshot_digits": ("digits", 33)}
NUM_CLASSES = 10


def check_fewshot_config(d: dict) -> None:
    """Sizes that a balanced draw can honour (raises :class:`~eqzoo.errors.ConfigError`)."""
    if d["train_size"] is None:
        raise ConfigError(f"config key 'data.train_size' is required for {d['name']}: the number of labelled "
                          f"training images, {NUM_CLASSES} x the labels per class")
    for key in ("train_size", "val_size"):
        if d[key] is not None and d[key] % NUM_CLASSES:
            raise ConfigError(f"config key 'data.{key}' for {d['name']} must be a multiple of {NUM_CLASSES} "
                              f"(the same number of images per class), got {d[key]}")
    if d["classes"] is not None:
        raise ConfigError(f"config key 'data.classes' does not apply to {d['name']} (it always has the 10 digits)")


def per_class_indices(labels: torch.Tensor, per_class: int, rng: np.random.Generator,
                      exclude: np.ndarray | None = None) -> np.ndarray:
    """``per_class`` indices of each class in ``labels`` (none of ``exclude``), in a seeded order."""
    y = np.asarray(labels)
    free = np.ones(len(y), bool)
    if exclude is not None:
        free[exclude] = False
    out = []
    for c in range(NUM_CLASSES):
        pool = np.nonzero((y == c) & free)[0]
        if len(pool) < per_class:
            raise ConfigError(f"{per_class} images per class requested, but class {c} has only {len(pool)} left")
        out.append(rng.choice(pool, size=per_class, replace=False))
    return rng.permutation(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _split(x, y, ids, symmetry: str, seed: int, size: int, resize_after: bool):
    if not len(ids):
        return None
    if resize_after:  # MNIST: transformed at its own 28x28, as the mnist data sets are, then resized
        xt, yt, el = make_transformed(x[ids], y[ids], symmetry, seed)
        if xt.shape[-1] != size:
            xt = F.interpolate(xt[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    else:  # 8x8 digits: upsampled first, so that rotations act on the image the model sees
        xt, yt, el = make_transformed(x[ids], y[ids], symmetry, seed, image_size=size)
    images = (xt * 255).round().clamp(0, 255).to(torch.uint8)
    return ImageTensorDataset(images, yt, el, NUM_CLASSES)


def build_fewshot(d: dict) -> Splits:
    """Train / val / test splits of a resolved ``data`` section of a few-label task."""
    check_fewshot_config(d)
    source, default_size = FEWSHOT[d["name"]]
    size, sym, seed = d["image_size"] or default_size, d["symmetry"] or "SO2", d["seed"]
    rng = np.random.default_rng(seed)
    n_val = d["val_size"] or 0
    if source == "mnist":
        x, y = load_mnist_arrays(d["root"], train=True)
        x_test, y_test = load_mnist_arrays(d["root"], train=False)
    else:
        x, y = load_digits_arrays()
    train = per_class_indices(y, d["train_size"] // NUM_CLASSES, rng)
    val = per_class_indices(y, n_val // NUM_CLASSES, rng, exclude=train)
    if source == "mnist":
        test = np.random.default_rng(seed + 1).permutation(len(y_test))
    else:
        x_test, y_test = x, y
        rest = np.setdiff1d(np.arange(len(y)), np.concatenate([train, val]))
        test = np.random.default_rng(seed + 1).permutation(rest)
    if d["test_size"] is not None:
        if d["test_size"] > len(test):
            raise ConfigError(f"config key 'data.test_size' is {d['test_size']}, but {d['name']} has only "
                              f"{len(test)} test images left")
        test = test[:d["test_size"]]
    after = source == "mnist"
    return Splits(_split(x, y, train, sym, seed * 1000, size, after),
                  _split(x, y, val, sym, seed * 1000 + 1, size, after),
                  _split(x_test, y_test, test, sym, seed * 1000 + 2, size, after),
                  num_classes=NUM_CLASSES, in_chans=1)
