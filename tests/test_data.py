"""Data sets: group transforms, the shipped digits set, the DDMNIST generator (on synthetic digits
everywhere, on real MNIST where the workplace's offline-mnist tool exists), missing-data errors."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eqzoo.config import ConfigError, load_config
from eqzoo.data import (DataNotFoundError, build_datasets, data_info, make_ddmnist, parse_group, sample_elements,
                        transform_images)
from eqzoo.data.mnist import load_digits_arrays, load_mnist_arrays

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_MNIST = ROOT.parent / "shared" / "tools" / "offline-mnist"


def data_cfg(**kw):
    return load_config({"model": "resnet18", "data": kw})["data"]


def test_parse_group():
    assert parse_group("C1") == (1, False)
    assert parse_group("d4") == (4, True)
    assert parse_group("SO2") == (None, False)
    assert parse_group("O2") == (None, True)
    assert parse_group("D1") == (1, True)
    with pytest.raises(ValueError, match="accepted"):
        parse_group("E3")


def test_one_group_parser():
    """The data's groups and the models' groups are read by the same parser."""
    from eqzoo.groups import get_group

    assert parse_group("SO(2)") == (None, False) and parse_group("o(2)") == (None, True)
    assert get_group("SO(2)") is get_group("so2") and get_group("O(2)").spec == "O2"
    with pytest.raises(ValueError, match="accepted"):
        get_group("E3")


def test_sample_elements_stay_in_their_group():
    rng = np.random.default_rng(0)
    f, a = sample_elements("C4", 200, rng)
    assert not f.any() and np.allclose(np.mod(a, math.pi / 2), 0) and len(set(np.round(a, 6))) == 4
    f, a = sample_elements("D1", 200, rng)
    assert set(f) == {0, 1} and not a.any()
    f, a = sample_elements("SO2", 200, rng)
    assert not f.any() and len(set(np.round(a, 6))) == 200
    f, a = sample_elements("C1", 10, rng)
    assert not f.any() and not a.any()


def test_transform_images_exact_on_the_grid_and_rotation_direction():
    x = torch.rand(4, 12, 12)
    out = transform_images(x, [0, 0, 1, 1], [0, math.pi / 2, 0, 3 * math.pi / 2])
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], torch.rot90(x[1], 1, (-2, -1)))  # exact, counter-clockwise
    assert torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[3], torch.rot90(x[3].flip(-1), 3, (-2, -1)))  # flip first, then rotate
    # the bilinear path agrees with the exact one in direction
    near = transform_images(x[:1], [0], [math.pi / 2 + 1e-6])
    assert torch.allclose(near[0], torch.rot90(x[0], 1, (-2, -1)), atol=1e-3)


def test_digits_deterministic_and_each_image_an_element_of_its_group():
    d = data_cfg(name="digits", symmetry="C4", image_size=16, train_size=64, val_size=16, test_size=32)
    a, b = build_datasets(d), build_datasets(d)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.num_classes == 10 and a.in_chans == 1 and len(a.train) == 64 and len(a.val) == 16
    x, y = a.train[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    angles = a.train.elements["angle"]
    assert len(set(np.round(angles, 6))) > 1 and np.allclose(np.mod(angles, math.pi / 2), 0)
    # undoing each image's rotation gives the same upright digit as generating with C1
    c1 = build_datasets(dict(d, symmetry="C1"))
    k = np.rint(angles / (math.pi / 2)).astype(int)
    undone = torch.stack([torch.rot90(img, -int(q), (-2, -1)) for img, q in zip(a.train.images, k)])
    assert torch.equal(undone, c1.train.images)
    sub = build_datasets(dict(d, classes=[3, 5, 7], train_size=40, val_size=8, test_size=8))
    assert sub.num_classes == 3 and set(sub.train.labels.tolist()) == {0, 1, 2}


def _synthetic_digits(n_per_digit=6, size=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10 * n_per_digit, size, size, generator=g)
    y = torch.arange(10).repeat_interleave(n_per_digit)
    return x, y


def test_ddmnist_generator_on_synthetic_digits():
    x, y = _synthetic_digits()
    canvas, labels, el = make_ddmnist(x, y, per_class=3, symmetry=("C1", "SO2"), seed=1)
    s = x.shape[-1]
    assert canvas.shape == (300, 2 * s, 2 * s)
    assert sorted(set(labels.tolist())) == list(range(100)) and torch.bincount(labels).eq(3).all()
    # each side shows a digit of its class's digit
    assert torch.equal(y[el["left_index"]], labels // 10) and torch.equal(y[el["right_index"]], labels % 10)
    top = s // 2
    left, right = canvas[:, top:top + s, :s], canvas[:, top:top + s, s:]
    # left group C1: the raw digit, untouched; right group SO(2): its own rotation of the raw digit
    assert torch.equal(left, x[el["left_index"]])
    assert not el["right_flip"].any() and len(set(np.round(el["right_angle"], 6))) == 300
    assert torch.allclose(right, transform_images(x[el["right_index"]], el["right_flip"], el["right_angle"]))
    assert not torch.allclose(right, x[el["right_index"]], atol=1e-2)
    outside = canvas.clone()
    outside[:, top:top + s] = 0
    assert outside.abs().max() == 0  # nothing above or below the digits
    # the left and right transforms are drawn independently, each from its own group
    canvas2, labels2, el2 = make_ddmnist(x, y, per_class=3, symmetry=("D4", "C1"), seed=1)
    left2 = canvas2[:, top:top + s, :s]
    src = x[el2["left_index"]]
    d4 = [transform_images(src, np.full(len(src), f), np.full(len(src), k * math.pi / 2))
          for f in (0, 1) for k in range(4)]
    assert all(any(torch.equal(left2[i], t[i]) for t in d4) for i in range(len(src)))
    assert len(set(zip(el2["left_flip"], np.round(el2["left_angle"], 6)))) == 8
    assert torch.equal(canvas2[:, top:top + s, s:], x[el2["right_index"]])
    # deterministic in the seed
    again = make_ddmnist(x, y, per_class=3, symmetry=("C1", "SO2"), seed=1)[0]
    assert torch.equal(again, canvas)
    assert not torch.equal(make_ddmnist(x, y, per_class=3, symmetry=("C1", "SO2"), seed=2)[0], canvas)


def test_missing_mnist_says_how_to_get_it(tmp_path):
    d = data_cfg(name="ddmnist", root=str(tmp_path))
    with pytest.raises(DataNotFoundError, match=r"MNIST\('.*', download=True\).*MNIST/raw"):
        data_info(d)
    with pytest.raises(DataNotFoundError, match="download=True"):
        load_mnist_arrays(str(tmp_path), train=True)
    with pytest.raises(DataNotFoundError, match=r"CIFAR10\(.*download=True"):
        data_info(data_cfg(name="cifar10", root=str(tmp_path)))
    with pytest.raises(DataNotFoundError, match="train"):
        data_info(data_cfg(name="imagefolder", root=str(tmp_path)))


def test_bad_data_sections():
    with pytest.raises(ConfigError, match="data.name.*digits"):
        data_cfg(name="imagenet-21k")
    with pytest.raises(ConfigError, match=r"\[left group, right group\]"):
        data_cfg(name="ddmnist", symmetry="C4")
    with pytest.raises(ConfigError, match="unknown group 'Q7'"):
        data_cfg(name="digits", symmetry="Q7")
    with pytest.raises(ConfigError, match="multiple of 100"):
        data_cfg(name="ddmnist", train_size=150)
    with pytest.raises(ConfigError, match="distinct digits"):
        data_cfg(name="digits", classes=[1, 1])


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """Real MNIST as torchvision IDX files, written by the workplace's offline tool. Where the tool
    is absent (a CI checkout without ../shared) the real-MNIST tests skip; the generator itself is
    covered above on synthetic digits."""
    if os.environ.get("EQZOO_MNIST_ROOT"):  # provided by .ci/run (or a user's own MNIST copy)
        return os.environ["EQZOO_MNIST_ROOT"]
    if not OFFLINE_MNIST.is_file():
        pytest.skip(f"{OFFLINE_MNIST} not present: real-MNIST checks skipped (generator tested on synthetic digits)")
    root = tmp_path_factory.mktemp("mnist")
    subprocess.run([sys.executable, str(OFFLINE_MNIST), str(root)], check=True, capture_output=True, timeout=300)
    return str(root)


def test_ddmnist_from_real_mnist(mnist_root):
    d = data_cfg(name="ddmnist", root=mnist_root, symmetry=["C1", "C4"], train_size=200, val_size=100, test_size=100)
    assert data_info(d) == {"num_classes": 100, "in_chans": 1}
    s = build_datasets(d)
    assert len(s.train) == 200 and len(s.val) == 100 and len(s.test) == 100 and s.num_classes == 100
    x, label = s.train[5]
    assert x.shape == (1, 56, 56)
    raw = load_mnist_arrays(mnist_root, train=False)[0]
    el = s.test.elements
    imgs = s.test.images  # uint8 canvases
    raw_u8 = (raw * 255).round().to(torch.uint8)
    left = imgs[:, 14:42, :28]
    right = imgs[:, 14:42, 28:]
    assert torch.equal(left, raw_u8[el["left_index"]])  # upright: exactly the MNIST digit
    k = np.rint(el["right_angle"] / (math.pi / 2)).astype(int)
    assert len(set(k % 4)) == 4
    for i in range(len(imgs)):  # right digits: exact quarter turns of theirs
        assert torch.equal(right[i], torch.rot90(raw_u8[el["right_index"][i]], int(k[i]), (-2, -1)))
    labels = load_mnist_arrays(mnist_root, train=False)[1]
    assert torch.equal(10 * labels[el["left_index"]] + labels[el["right_index"]], s.test.labels)


def test_mnist_family_from_real_mnist(mnist_root):
    for name, n_angles in (("rotmnist", 50), ("c4mnist", 4), ("mnist", 1)):
        s = build_datasets(data_cfg(name=name, root=mnist_root, train_size=50, val_size=10, test_size=20))
        assert len(s.train) == 50 and s.train[0][0].shape == (1, 28, 28) and s.num_classes == 10
        assert len(set(np.round(s.train.elements["angle"], 6))) == n_angles


def test_ddmnist_resampled_draws_new_elements_each_read(mnist_root):
    """data.resample: the training canvases are drawn afresh on every read (the paper's
    protocol), from the same digit pairs, reproducibly under torch's seed; val/test stay fixed."""
    d = data_cfg(name="ddmnist", root=mnist_root, symmetry=["C4", "C4"], resample=True,
                 train_size=200, val_size=100, test_size=100)
    s = build_datasets(d)
    fixed = build_datasets(dict(d, resample=False))
    assert torch.equal(s.test.images, fixed.test.images)
    torch.manual_seed(0)
    first = [s.train[i] for i in range(20)]
    again = [s.train[i] for i in range(20)]
    torch.manual_seed(0)
    replay = [s.train[i] for i in range(20)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, replay))
    assert sum(not torch.equal(a[0], b[0]) for a, b in zip(first, again)) >= 10
    assert [y for _, y in first] == [int(v) for v in fixed.train.labels[:20]]
    # the same digits, each on its side, turned by a quarter turn: each side's pixel multiset is kept
    for i in range(20):
        x, canvas = first[i][0][0], fixed.train.images[i].float() / 255
        for side in (slice(0, 28), slice(28, 56)):
            assert torch.allclose(x[:, side].sort().values.flatten().sort().values,
                                  canvas[:, side].flatten().sort().values, atol=2 / 255)


def test_resample_only_for_ddmnist():
    with pytest.raises(ConfigError, match="data.resample"):
        data_cfg(name="digits", resample=True)


def _image_folder(root, mode, side=12, per_class=4):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                shape = (side, side) if mode == "L" else (side, side, 3)
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


def test_grayscale_image_folder_follows_the_model_channels(tmp_path):
    import json

    from eqzoo.train import train

    root = _image_folder(tmp_path / "gray", "L")
    cfg = {"model": "pe_resnet18", "data": {"name": "imagefolder", "root": str(root), "batch_size": 4},
           "model_args": {"in_chans": 1, "group": "C4", "layers": [1, 1, 1, 1], "stem_width": 8,
                          "channels": [8, 8, 8, 8]},
           "schedule": {"epochs": 1}, "output": str(tmp_path / "run"), "progress": False, "tensorboard": False}
    d = load_config(cfg)["data"]
    assert data_info(d, 1) == {"num_classes": 2, "in_chans": 1}
    assert build_datasets(d, None, 1).train[0][0].shape == (1, 12, 12)  # the images' own size, one channel
    assert build_datasets(d, None, 3).train[0][0].shape == (3, 12, 12)
    res = train(cfg)
    assert res["status"] == "finished"
    saved = json.loads((tmp_path / "run" / "hub" / "config.json").read_text())["pretrained_cfg"]
    assert saved["input_size"] == [1, 12, 12] and len(saved["mean"]) == len(saved["std"]) == 1
    # channels the data cannot give: refused before anything is written
    for args, match in (({"in_chans": 2}, r"'model_args.in_chans' is 2: an ImageFolder is read as grayscale"),):
        with pytest.raises(ConfigError, match=match):
            train(dict(cfg, model_args=dict(cfg["model_args"], **args), output=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match=r"'model_args.in_chans' is 3, but digits has grayscale images"):
        train(dict(cfg, data={"name": "digits"}, model_args=dict(cfg["model_args"], in_chans=3),
                   output=str(tmp_path / "bad")))
    assert not (tmp_path / "bad").exists()


def test_augmentation_adds_no_flip_unless_asked(tmp_path):
    root = _image_folder(tmp_path / "rgb", "RGB", side=20, per_class=1)
    plain = build_datasets(data_cfg(name="imagefolder", root=str(root)), None, 3).train.dataset.transform
    names = [type(t).__name__ for t in plain.transforms]
    assert not any("Flip" in n for n in names) and "RandomResizedCropAndInterpolation" in names, names
    flipped = build_datasets(data_cfg(name="imagefolder", root=str(root), hflip=0.5), None, 3).train.dataset.transform
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in flipped.transforms]
    assert plain.transforms[0].size == (20, 20)  # the data set's own size, not the model's 224
    with pytest.raises(ConfigError, match=r"'data.hflip' applies to natural images; the digit sets' flips are "
                                          r"data.symmetry"):
        data_cfg(name="digits", hflip=0.5)
    with pytest.raises(ConfigError, match=r"'data.train_size' \+ 'data.val_size' = 5 exceed the 2 training images"):
        build_datasets(data_cfg(name="imagefolder", root=str(root), train_size=5), None, 3)
