"""Tests for anybit.data: IDX/CIFAR readers, safe unpickling, datasets, augmentation and error messages."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from anybit import data
from anybit.data import registry
from anybit.data.errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from anybit.data.idx import read_idx, write_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("ANYBIT_DATA", raising=False)


@pytest.fixture(scope="module")
def fashion_train():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    return data.load("fashion-mnist", "train")


@pytest.fixture(scope="module")
def fashion_test():
    if not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    return data.load("fashion-mnist", "test")


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    return header + array.astype(">u1" if code == 0x08 else ">i4").tobytes()


def _write_fashion(directory: Path, prefix: str, n: int, seed: int = 0, gz: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images


# --- Fashion-MNIST, real files -------------------------------------------------------------------


def test_fashion_train_real(fashion_train):
    ds = fashion_train
    assert len(ds) == 60000 and ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 32
    assert ds.source == str(FASHION_DIR) and ds.name == "fashion-mnist" and ds.split == "train"
    assert ds.targets.dtype == torch.int64
    assert torch.bincount(ds.targets, minlength=10).tolist() == [6000] * 10
    image, label = ds[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)


def test_fashion_test_real_normalised(fashion_test):
    ds = fashion_test
    assert len(ds) == 10000 and ds.augment is False
    assert ds.targets.min() == 0 and ds.targets.max() == 9
    assert torch.bincount(ds.targets, minlength=10).tolist() == [1000] * 10
    batch = torch.stack([x for x, _ in ds.__getitems__(range(2000))])
    assert batch.shape == (2000, 1, 32, 32)
    centre = batch[:, :, 2:30, 2:30]
    assert abs(centre.mean().item()) < 0.05 and abs(centre.std().item() - 1) < 0.05
    border = batch[:, :, :2, :]
    assert torch.allclose(border, torch.tensor(-0.2860 / 0.3530))


def test_fashion_raw_size(fashion_test):
    raw = data.load("FashionMNIST", "test", image_size=28)
    assert raw.image_size == 28 and raw[0][0].shape == (1, 28, 28)
    assert torch.equal(raw[5][0], fashion_test[5][0][:, 2:30, 2:30])
    assert data.dataset_info("fashion_mnist", image_size=28)["image_size"] == 28


@needs_fashion
def test_fashion_data_dir_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_DIR / name, tmp_path / name)
    images = _write_fashion(tmp_path, "train", 30)
    test = data.load("fashion-mnist", "test", data_dir=tmp_path)
    assert len(test) == 10000 and test.source == str(tmp_path)
    train = data.load("fashion-mnist", "train", data_dir=str(tmp_path), augment=False, image_size=28)
    assert len(train) == 30
    expected = (torch.from_numpy(images[3]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(train[3][0][0], expected, atol=1e-5)


def test_fashion_env_var_and_subfolder(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    (tmp_path / "fashion-mnist").mkdir()
    _write_fashion(tmp_path / "fashion-mnist", "t10k", 20, gz=False)
    monkeypatch.setenv("ANYBIT_DATA", str(tmp_path))
    ds = data.load("fashion-mnist", "test")
    assert len(ds) == 20 and ds.source == str(tmp_path / "fashion-mnist")


# --- IDX -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("img.idx" + (".gz" if gz else ""))
    payload = _idx_bytes(images)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    assert np.array_equal(read_idx(path, 0x803), images)
    ints = np.array([1, -2, 300], dtype=np.int32)
    write_idx(tmp_path / "ints.idx", ints)
    assert (tmp_path / "ints.idx").read_bytes() == _idx_bytes(ints, code=0x0C)
    assert np.array_equal(read_idx(tmp_path / "ints.idx"), ints)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(12))
    with pytest.raises(DatasetFormatError, match="bad-idx3-ubyte.*magic"):
        read_idx(path)
    labels = tmp_path / "labels"
    labels.write_bytes(_idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetFormatError, match="expected 0x00000803"):
        read_idx(labels, 0x803)


def test_idx_truncated(tmp_path):
    payload = _idx_bytes(np.zeros((5, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes(payload[:-10])
    with pytest.raises(DatasetFormatError, match="short.*truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "short.gz").write_bytes(gzip.compress(payload)[:-20])
    with pytest.raises(DatasetFormatError, match="short.gz"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "header").write_bytes(payload[:9])
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(tmp_path / "header")


# --- CIFAR -----------------------------------------------------------------------------------------


def _cifar_batch(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, num_classes, n)]


def _write_pickle(path: Path, obj, protocol: int | str = 2) -> None:
    if protocol == "numpy1":  # what numpy 1.x wrote, as in the files torchvision downloads
        payload = pickle.dumps(obj, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        path.write_bytes(payload)
        return
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, "numpy1", pickle.DEFAULT_PROTOCOL, 5])
def test_cifar10_pickled(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(4, 10, i) for i in range(6)]
    for i, (pixels, labels) in enumerate(batches[:5], 1):
        _write_pickle(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": pixels, b"labels": labels}, protocol)
    _write_pickle(folder / "test_batch", {b"data": batches[5][0], b"labels": batches[5][1]}, protocol)
    train = data.load("cifar10", data_dir=tmp_path, augment=False)
    assert len(train) == 20 and train.num_classes == 10 and train.in_channels == 3 and train.image_size == 32
    assert train.source == str(folder)
    assert train.targets.tolist() == sum((b[1] for b in batches[:5]), [])
    assert torch.equal(train.images[5], torch.from_numpy(batches[1][0][1].reshape(3, 32, 32)))
    expected = (train.images[0].float() / 255 - torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)) / torch.tensor(
        [0.2470, 0.2435, 0.2616]
    ).view(3, 1, 1)
    assert torch.allclose(train[0][0], expected, atol=1e-5)
    test = data.load("cifar10", "test", data_dir=folder)
    assert len(test) == 4 and test.targets.tolist() == batches[5][1]


def test_cifar100_pickled(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    pixels, fine = _cifar_batch(6, 100, 0)
    _write_pickle(folder / "train", {b"data": pixels, b"fine_labels": fine, b"coarse_labels": [0] * 6})
    _write_pickle(folder / "test", {b"data": pixels[:2], b"fine_labels": fine[:2], b"coarse_labels": [0] * 2})
    monkeypatch.setenv("ANYBIT_DATA", str(tmp_path))
    train = data.load("CIFAR100")
    assert len(train) == 6 and train.num_classes == 100 and train.targets.tolist() == fine
    assert train.mean == (0.5071, 0.4865, 0.4409)
    assert len(data.load("cifar100", "test")) == 2


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_forbidden_global_not_executed(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    pixels, fine = _cifar_batch(2, 100, 0)
    _write_pickle(folder / "test", {b"data": pixels, b"fine_labels": fine, b"x": _Evil(marker)})
    with pytest.raises(DatasetFormatError, match=r"system"):
        data.load("cifar100", "test", data_dir=tmp_path)
    assert not marker.exists()


def test_cifar_bad_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(b"\x80\x02}q\x00(")
    with pytest.raises(DatasetFormatError, match="not a readable pickle"):
        data.load("cifar100", "test", data_dir=tmp_path)
    _write_pickle(folder / "test", {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DatasetFormatError, match="shape"):
        data.load("cifar100", "test", data_dir=tmp_path)
    _write_pickle(folder / "test", {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]})
    with pytest.raises(DatasetFormatError, match="labels range"):
        data.load("cifar100", "test", data_dir=tmp_path)


def test_cifar_binary(tmp_path):
    folder10 = tmp_path / "cifar-10-batches-bin"
    folder10.mkdir()
    pixels, labels = _cifar_batch(3, 10, 1)
    records = np.concatenate([np.array(labels, np.uint8)[:, None], pixels], axis=1)
    (folder10 / "test_batch.bin").write_bytes(records.tobytes())
    ds = data.load("cifar10", "test", data_dir=tmp_path)
    assert ds.targets.tolist() == labels and ds.source == str(folder10)
    assert torch.equal(ds.images[2], torch.from_numpy(pixels[2].reshape(3, 32, 32)))

    folder100 = tmp_path / "cifar-100-binary"
    folder100.mkdir()
    records = np.concatenate([np.full((3, 1), 7, np.uint8), np.array([[5], [99], [0]], np.uint8), pixels], axis=1)
    (folder100 / "test.bin").write_bytes(records.tobytes())
    assert data.load("cifar100", "test", data_dir=tmp_path).targets.tolist() == [5, 99, 0]
    (folder100 / "test.bin").write_bytes(records.tobytes()[:-1])
    with pytest.raises(DatasetFormatError, match="test.bin.*truncated"):
        data.load("cifar100", "test", data_dir=tmp_path)


# --- imagefolder -----------------------------------------------------------------------------------


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    train = data.load("imagefolder", data_dir=tmp_path, image_size=16)
    assert len(train) == 6 and train.num_classes == 2 and train.in_channels == 3 and train.image_size == 16
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label == 0
    test = data.load("imagefolder", "test", data_dir=tmp_path, image_size=16)
    assert test.source == str(tmp_path / "val") and test.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(test[4][0], test[4][0])
    part = test.subset(2, seed=1)
    assert len(part) == 2 and isinstance(part, data.ImageFolderDataset)
    with pytest.raises(DatasetNotFoundError, match="data-dir"):
        data.load("imagefolder")
    with pytest.raises(DatasetNotFoundError, match="nothing"):
        data.load("imagefolder", data_dir=tmp_path / "nothing")


# --- synthetic -------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_learnable():
    a = data.load("synthetic", seed=3)
    b = data.load("synthetic", seed=3)
    assert len(a) == 512 and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    test = data.load("synthetic", "test", seed=3)
    assert len(test) == 256 and a.augment is False and a.source == "synthetic"
    assert not torch.equal(a.images[:256], test.images)
    assert not torch.equal(data.load("synthetic", seed=4).images, a.images)
    assert torch.bincount(a.targets, minlength=10).min() >= 50
    # nearest class mean computed on train classifies test well: the templates are shared
    x_train = torch.stack([x for x, _ in a.__getitems__(range(len(a)))]).flatten(1)
    x_test = torch.stack([x for x, _ in test.__getitems__(range(len(test)))]).flatten(1)
    means = torch.stack([x_train[a.targets == k].mean(0) for k in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == test.targets).float().mean()
    assert accuracy > 0.9


def test_synthetic_options():
    ds = data.load("synthetic", "test", num_samples=30, num_classes=3, channels=1, image_size=8)
    assert ds.images.shape == (30, 1, 8, 8) and ds.num_classes == 3 and set(ds.targets.tolist()) == {0, 1, 2}
    info = data.dataset_info("synthetic", num_classes=3, channels=1, image_size=8)
    assert (info["num_classes"], info["in_channels"], info["image_size"]) == (3, 1, 8)
    assert data.dataset_info("cifar100") == {"name": "cifar100", "num_classes": 100, "in_channels": 3, "image_size": 32}


# --- augmentation and batching ---------------------------------------------------------------------


def test_augmentation_train_varies_test_fixed():
    train = data.load("synthetic", num_samples=64, augment=True)
    assert train.augment is True
    first = torch.stack([x for x, _ in train.__getitems__(range(64))])
    second = torch.stack([x for x, _ in train.__getitems__(range(64))])
    assert first.shape == second.shape == (64, 3, 32, 32) and not torch.equal(first, second)
    torch.manual_seed(0)
    seeded = train[3][0]
    torch.manual_seed(0)
    assert torch.equal(seeded, train[3][0])
    test = data.load("synthetic", "test", num_samples=16)
    assert torch.equal(test[2][0], test[2][0])


def test_random_crop_flip_is_a_shift_or_flip():
    from anybit.data.datasets import random_crop_flip

    images = torch.randint(1, 256, (50, 2, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, 2)
    for src, dst in zip(images, out):
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        crops = [padded[:, y : y + 8, x : x + 8] for y in range(5) for x in range(5)]
        assert any(torch.equal(dst, c) or torch.equal(dst, c.flip(-1)) for c in crops)


def test_getitems_matches_getitem_and_loader():
    ds = data.load("synthetic", num_samples=40, augment=False)
    items = ds.__getitems__([3, 0, 39])
    for (x, y), i in zip(items, [3, 0, 39]):
        assert torch.equal(x, ds[i][0]) and y == ds[i][1]
    loader = data.make_loader(ds, batch_size=16, shuffle=True, seed=1)
    xb, yb = next(iter(loader))
    assert xb.shape == (16, 3, 32, 32) and yb.dtype == torch.int64
    again = next(iter(data.make_loader(ds, batch_size=16, shuffle=True, seed=1)))
    assert torch.equal(xb, again[0]) and torch.equal(yb, again[1])
    assert sum(len(b[1]) for b in data.make_loader(ds, 16, shuffle=False, drop_last=True)) == 32


def test_subset():
    ds = data.load("synthetic", num_samples=40)
    part = ds.subset(10, seed=2)
    assert type(part) is data.ImageDataset and len(part) == 10 and part.num_classes == 10
    assert torch.equal(part.images, ds.subset(10, seed=2).images)
    assert len(ds) == 40
    with pytest.raises(ValueError, match="40"):
        ds.subset(41)


# --- errors ----------------------------------------------------------------------------------------


def test_missing_dataset_lists_directories(tmp_path, monkeypatch):
    env, given, system = tmp_path / "env", tmp_path / "given", tmp_path / "system"
    for d in (env, given, system):
        d.mkdir()
    monkeypatch.setattr(registry, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setenv("ANYBIT_DATA", str(env))
    with pytest.raises(DatasetNotFoundError) as info:
        data.load("fashion-mnist")
    message = str(info.value)
    for d in (env, env / "fashion-mnist", system):
        assert str(d) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message
    assert isinstance(info.value, FileNotFoundError) and "\n" not in message
    # an explicit directory is the only place looked in: never replaced by $ANYBIT_DATA or the system copy
    with pytest.raises(DatasetNotFoundError) as info:
        data.load("fashion-mnist", data_dir=given)
    message = str(info.value)
    assert str(given) in message and str(given / "fashion-mnist") in message
    assert str(env) not in message and str(system) not in message

    with pytest.raises(DatasetNotFoundError) as info:
        data.load("cifar10", "test")
    message = str(info.value)
    assert str(env / "cifar-10-batches-py") in message and str(env / "cifar-10-batches-bin") in message
    assert "torchvision.datasets.CIFAR10(root=" in message and "download=True" in message
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        data.load("cifar10", "test", data_dir=given)


def test_bad_names_splits_options():
    with pytest.raises(UnknownDatasetError, match="fashion-mnist.*cifar10.*synthetic"):
        data.load("mnist-ish")
    with pytest.raises(UnknownDatasetError):
        data.dataset_info("nope")
    with pytest.raises(ValueError, match="train, test"):
        data.load("synthetic", "validation")
    with pytest.raises(ValueError, match="num_sample"):
        data.load("synthetic", num_sample=3)
