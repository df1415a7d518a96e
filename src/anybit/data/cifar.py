"""CIFAR-10/100 readers for torchvision's pickled layout and the binary layout, without unsafe unpickling.

The pickled batches are read by ``RestrictedUnpickler``, which can only build numpy arrays: a batch file
that names any other global (``os.system``, ``builtins.eval``, ...) is rejected before anything runs.
"""

from __future__ import annotations

import importlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetFormatError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """One on-disk layout: its folder name, the files of each split, and whether they are binary records."""

    folder: str
    files: dict[str, tuple[str, ...]]
    binary: bool


LAYOUTS: dict[int, tuple[CifarLayout, ...]] = {
    10: (
        CifarLayout(
            "cifar-10-batches-py",
            {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
            binary=False,
        ),
        CifarLayout(
            "cifar-10-batches-bin",
            {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
            binary=True,
        ),
    ),
    100: (
        CifarLayout("cifar-100-python", {"train": ("train",), "test": ("test",)}, binary=False),
        CifarLayout("cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)}, binary=True),
    ),
}


def _numpy_core(submodule: str, name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        try:
            module = importlib.import_module(f"numpy._core.{submodule}")
        except ImportError:
            module = importlib.import_module(f"numpy.core.{submodule}")
        return getattr(module, name)

    return resolve


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: importlib.import_module("_codecs").encode,
}
for _package in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_package}.multiarray", "_reconstruct")] = _numpy_core("multiarray", "_reconstruct")
    _ALLOWED_GLOBALS[(f"{_package}.multiarray", "scalar")] = _numpy_core("multiarray", "scalar")
    _ALLOWED_GLOBALS[(f"{_package}.numeric", "_frombuffer")] = _numpy_core("numeric", "_frombuffer")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, dtypes and plain containers; anything else is refused."""

    def __init__(self, file: Any, source: str | os.PathLike = "<pickle>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DatasetFormatError(
                f"{self.source}: pickle refers to {module}.{name}, which a CIFAR batch never contains; "
                "refusing to load it (the file is not a CIFAR batch, or has been tampered with)"
            )
        return resolve()

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetFormatError(f"{self.source}: pickle uses persistent ids, which a CIFAR batch never contains")


def safe_unpickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with RestrictedUnpickler; every failure becomes a DatasetFormatError."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=path).load()
    except DatasetFormatError:
        raise
    except Exception as e:  # untrusted input: any parse failure means a bad file
        raise DatasetFormatError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _field(batch: dict, key: str) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DatasetFormatError(f"missing key {key!r}")


def _check_labels(path: Path, labels: np.ndarray, count: int, num_classes: int) -> np.ndarray:
    if labels.shape != (count,):
        raise DatasetFormatError(f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {count} images")
    if count and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(
            f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
    return labels.astype(np.int64)


def read_pickled_batch(path: str | os.PathLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled batch file into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = Path(path)
    batch = safe_unpickle(path)
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: expected a dict, found {type(batch).__name__}")
    label_key = "labels" if num_classes == 10 else "fine_labels"
    try:
        data, labels = _field(batch, "data"), _field(batch, label_key)
    except DatasetFormatError as e:
        raise DatasetFormatError(f"{path}: {e}; keys are {sorted(map(str, batch))}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", None)
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {PIXELS}), found {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetFormatError(f"{path}: {label_key!r} is not a list of integers ({e})") from e
    labels = _check_labels(path, labels, len(data), num_classes)
    return data.reshape(-1, 3, 32, 32).copy(), labels


def read_binary_batch(path: str | os.PathLike, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch (records of label byte(s) + 3072 pixels) into uint8 images and int64 labels."""
    path = Path(path)
    label_bytes = 1 if num_classes == 10 else 2
    record = label_bytes + PIXELS
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % record:
        raise DatasetFormatError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte records; the file is truncated or "
            f"not a CIFAR-{num_classes} binary batch"
        )
    rows = raw.reshape(-1, record)
    labels = _check_labels(path, rows[:, label_bytes - 1].astype(np.int64), len(rows), num_classes)
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32).copy(), labels


def read_split(directory: str | os.PathLike, layout: CifarLayout, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and concatenate every batch file of ``split`` in ``directory``."""
    reader = read_binary_batch if layout.binary else read_pickled_batch
    parts = [reader(Path(directory) / name, num_classes) for name in layout.files[split]]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
