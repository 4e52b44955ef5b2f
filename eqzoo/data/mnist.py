"""Digit data sets with controlled symmetries: the MNIST family, double-digit MNIST, and `digits`.

Every data set here is *fixed*: the group element applied to image i is drawn once, from a seed,
when the data set is built (not per epoch). So a data set is the same in every run, process and
resume, and the amount of symmetry in it is exactly the group it was generated with.

- ``mnist`` / ``rotmnist`` / ``c4mnist`` / ``d4mnist``: real MNIST (torchvision, ``download=False``),
  each digit transformed by an element of C1 / SO(2) / C4 / D4 (or any ``symmetry``).
- ``ddmnist``: double-digit MNIST (Veefkind & Cesa 2024): two digits side by side on a 2s x 2s
  canvas (56x56 for MNIST), each transformed independently by an element of *its own* group; class
  ``10 * left + right`` (100 classes). Default ``[C1, SO2]``: left digit upright, right one rotated
  by any angle, so the right half needs rotation invariance and the left half must not have it.
- ``digits``: scikit-learn's ``load_digits`` (1797 images, 8x8, shipped with scikit-learn: no
  download), upsampled to ``image_size`` then transformed; for demos and tests.

The generators (:func:`make_transformed`, :func:`make_ddmnist`) take arrays of digit images and
labels, so they work on any digit source.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataNotFoundError
from .symmetry import sample_elements, transform_images

__all__ = ["ImageTensorDataset", "make_transformed", "make_ddmnist", "load_mnist_arrays", "load_digits_arrays",
           "MNIST_FILES", "DataNotFoundError", "mnist_missing_message"]

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]



class ImageTensorDataset(Dataset):
    """Images held in memory as ``uint8 [N, H, W]`` (or float in [0, 1]) with labels; items are
    ``(float [1, H, W] in [0, 1], int)``. The background stays 0, which matches the zero padding
    of the convolutions and of the rotations (a normalised background would make the corners a
    rotated image exposes look different from the rest)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, elements: dict | None = None,
                 num_classes: int | None = None):
        self.images, self.labels = images, labels.long()
        self.elements = elements or {}  # the group elements applied, per index (for inspection)
        self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return x[None], int(self.labels[i])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def make_transformed(images, labels, symmetry: str, seed: int, image_size: int | None = None):
    """Each image transformed by its own element of ``symmetry``; ``images`` float [N, H, W] in [0, 1]
    (resized to ``image_size`` first). Returns ``(images float, labels, elements)``."""
    x = _resize(torch.as_tensor(images, dtype=torch.float32), image_size)
    rng = np.random.default_rng(seed)
    flip, angle = sample_elements(symmetry, len(x), rng)
    return transform_images(x, flip, angle), torch.as_tensor(labels).long(), {"flip": flip, "angle": angle}


def _draw(pool_by_digit: dict, digit: int, n: int, rng: np.random.Generator) -> np.ndarray:
    pool = pool_by_digit[digit]
    if len(pool) == 0:
        raise ValueError(f"no images of digit {digit} to build the double-digit data set from")
    return rng.choice(pool, size=n, replace=len(pool) < n)


def make_ddmnist(images, labels, per_class: int, symmetry=("C1", "SO2"), seed: int = 0,
                 image_size: int | None = None):
    """Double-digit data set: ``per_class`` images for each of the 100 classes ``10 * left + right``.

    ``images``: float [N, s, s] in [0, 1] (single digits), ``labels``: digits 0..9. Each side's digit
    is drawn from the images of its digit and transformed by an element of that side's group
    (``symmetry = (left group, right group)``), then placed at rows ``s/2 : 3s/2`` of a 2s x 2s
    canvas, left digit in columns ``0 : s``, right digit in ``s : 2s``.

    Returns ``(canvas float [100 * per_class, 2s, 2s], labels, elements)``; ``elements`` holds per
    image the source indices and the group elements of both sides."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = np.asarray(labels)
    s = x.shape[-1]
    rng = np.random.default_rng(seed)
    pools = {d: np.nonzero(y == d)[0] for d in range(10)}
    classes = np.repeat(np.arange(100), per_class)
    left_digit, right_digit = classes // 10, classes % 10
    left_idx, right_idx = np.empty(len(classes), np.int64), np.empty(len(classes), np.int64)
    for d in range(10):  # draw each side's digits from that digit's pool (without replacement when possible)
        m = left_digit == d
        left_idx[m] = _draw(pools, d, int(m.sum()), rng)
        m = right_digit == d
        right_idx[m] = _draw(pools, d, int(m.sum()), rng)
    lf, la = sample_elements(symmetry[0], len(classes), rng)
    rf, ra = sample_elements(symmetry[1], len(classes), rng)
    canvas = torch.zeros(len(classes), 2 * s, 2 * s)
    top = s // 2
    canvas[:, top:top + s, :s] = transform_images(x[left_idx], lf, la)
    canvas[:, top:top + s, s:] = transform_images(x[right_idx], rf, ra)
    canvas = _resize(canvas, image_size)
    elements = {"left_index": left_idx, "right_index": right_idx, "left_flip": lf, "left_angle": la,
                "right_flip": rf, "right_angle": ra}
    return canvas, torch.as_tensor(classes).long(), elements


class ResampledDDMNIST(Dataset):
    """Double-digit MNIST whose digits are transformed afresh every time an item is read (so every
    epoch sees new elements): the paper's protocol. The pairs of source digits are fixed; the group
    elements come from torch's global RNG, so a seeded (and resumed) run draws the same ones."""

    def __init__(self, digits: torch.Tensor, left_idx, right_idx, labels: torch.Tensor, symmetry, image_size=None):
        self.digits, self.labels = digits, labels.long()
        self.left_idx, self.right_idx = torch.as_tensor(left_idx), torch.as_tensor(right_idx)
        self.symmetry, self.image_size, self.num_classes = tuple(symmetry), image_size, 100
        self.elements = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        s = self.digits.shape[-1]
        canvas = torch.zeros(1, 2 * s, 2 * s)
        seed = int(torch.randint(0, 2**31 - 1, ()))
        rng = np.random.default_rng(seed)
        for side, idx in enumerate((self.left_idx[i], self.right_idx[i])):
            flip, angle = sample_elements(self.symmetry[side], 1, rng)
            canvas[:, s // 2:s // 2 + s, side * s:(side + 1) * s] = transform_images(self.digits[idx][None], flip, angle)
        return _resize(canvas, self.image_size), int(self.labels[i])


def mnist_missing_message(root: str) -> str:
    raw = Path(root) / "MNIST" / "raw"
    return (f"MNIST not found: expected {', '.join(MNIST_FILES)} under {raw}. Get it with "
            f"`python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\"` "
            f"or copy the (un-gzipped) IDX files to {raw}; or set data.root to where MNIST is")


def load_mnist_arrays(root: str, train: bool):
    """Real MNIST through torchvision (``download=False``, as a user would): ``(float [N, 28, 28], labels)``."""
    from torchvision import datasets

    raw = Path(root) / "MNIST" / "raw"
    if not all((raw / f).is_file() for f in MNIST_FILES):
        raise DataNotFoundError(mnist_missing_message(root))
    try:
        ds = datasets.MNIST(root, train=train, download=False)
    except RuntimeError as e:
        raise DataNotFoundError(f"{mnist_missing_message(root)} ({e})") from None
    return ds.data.float() / 255, ds.targets.clone()


def load_digits_arrays():
    """scikit-learn's 8x8 digits as ``(float [1797, 8, 8] in [0, 1], labels)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.as_tensor(d.images, dtype=torch.float32) / 16.0, torch.as_tensor(d.target).long()


@dataclass
class Splits:
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    in_chans: int
    label_names: tuple[str, ...] | None = None  # the class names, where the data set has them


def _keep_classes(x, y, classes):
    if classes is None:
        return x, y
    keep = torch.isin(y, torch.as_tensor(classes))
    lut = {c: i for i, c in enumerate(classes)}
    return x[keep], torch.as_tensor([lut[int(v)] for v in y[keep]]).long()


def _seeded_split(n: int, sizes, seed: int):
    """Disjoint index sets of the given sizes from a seeded permutation of range(n)."""
    if sum(sizes) > n:
        raise ValueError(f"requested {' + '.join(map(str, sizes))} = {sum(sizes)} images but only {n} are available")
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for k in sizes:
        out.append(perm[start:start + k])
        start += k
    return out


def build_digits(d: dict) -> Splits:
    x, y = load_digits_arrays()
    x, y = _keep_classes(x, y, d["classes"])
    n = len(y)
    n_val = d["val_size"] if d["val_size"] is not None else min(200, n // 8)
    n_test = d["test_size"] if d["test_size"] is not None else min(400, n // 4)
    n_train = d["train_size"] if d["train_size"] is not None else n - n_val - n_test
    idx = _seeded_split(n, (n_train, n_val, n_test), d["seed"])
    sym, size, nc = d["symmetry"] or "C4", d["image_size"] or 16, len(d["classes"] or range(10))
    out = []
    for split, ids in enumerate(idx):
        xs, ys, el = make_transformed(x[ids], y[ids], sym, seed=d["seed"] * 1000 + split, image_size=size)
        out.append(ImageTensorDataset(xs, ys, el, nc) if len(ids) else None)
    return Splits(*out, num_classes=nc, in_chans=1)


def build_mnist(d: dict, default_symmetry: str) -> Splits:
    x_tr, y_tr = load_mnist_arrays(d["root"], train=True)
    x_te, y_te = load_mnist_arrays(d["root"], train=False)
    x_tr, y_tr = _keep_classes(x_tr, y_tr, d["classes"])
    x_te, y_te = _keep_classes(x_te, y_te, d["classes"])
    nc = len(d["classes"] or range(10))
    n_train = d["train_size"] if d["train_size"] is not None else 10000
    n_val = d["val_size"] if d["val_size"] is not None else 2000
    n_test = d["test_size"] if d["test_size"] is not None else len(y_te)
    tr, va = _seeded_split(len(y_tr), (n_train, n_val), d["seed"])
    (te,) = _seeded_split(len(y_te), (n_test,), d["seed"] + 1)
    sym, size = d["symmetry"] or default_symmetry, d["image_size"]
    out = []
    for split, (xs, ys, ids) in enumerate(((x_tr, y_tr, tr), (x_tr, y_tr, va), (x_te, y_te, te))):
        if not len(ids):
            out.append(None)
            continue
        xt, yt, el = make_transformed(xs[ids], ys[ids], sym, seed=d["seed"] * 1000 + split)
        out.append(ImageTensorDataset(_to_uint8(_resize(xt, size)), yt, el, nc))
    return Splits(*out, num_classes=nc, in_chans=1)


def build_ddmnist(d: dict) -> Splits:
    """Sizes are totals over the 100 classes and must be multiples of 100 (balanced classes).
    Defaults are the paper's: 100 training, 20 validation, 50 test images per class. Validation
    digits come from MNIST training images that no training canvas uses."""
    x_tr, y_tr = load_mnist_arrays(d["root"], train=True)
    x_te, y_te = load_mnist_arrays(d["root"], train=False)
    n_train = d["train_size"] if d["train_size"] is not None else 10000
    n_val = d["val_size"] if d["val_size"] is not None else 2000
    n_test = d["test_size"] if d["test_size"] is not None else 5000
    sym = tuple(d["symmetry"] or ("C1", "SO2"))
    # digits for validation canvases come from a held-out sixth of MNIST's training split
    tr_pool, va_pool = _seeded_split(len(y_tr), (len(y_tr) - len(y_tr) // 6, len(y_tr) // 6), d["seed"])
    out = []
    for split, (xs, ys, pool, n) in enumerate(((x_tr, y_tr, tr_pool, n_train), (x_tr, y_tr, va_pool, n_val),
                                               (x_te, y_te, np.arange(len(y_te)), n_test))):
        if n == 0:
            out.append(None)
            continue
        canvas, labels, el = make_ddmnist(xs[pool], ys[pool], n // 100, sym, seed=d["seed"] * 1000 + split,
                                          image_size=d["image_size"])
        if split == 0 and d["resample"]:
            digits = xs[pool]
            out.append(ResampledDDMNIST(digits, el["left_index"], el["right_index"], labels, sym, d["image_size"]))
            continue
        out.append(ImageTensorDataset(_to_uint8(canvas), labels, el, 100))
    return Splits(*out, num_classes=100, in_chans=1)
