"""``load(name, split)``: find a dataset's files, read them safely and wrap them as a Dataset.

Files are searched in ``data_dir``, then ``$ANYBIT_DATA`` (several directories separated by ``os.pathsep``),
then system locations; a missing dataset raises one DatasetNotFoundError listing every place looked in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import cifar
from .datasets import ImageDataset, ImageFolderDataset
from .errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .synthetic import MEAN as SYNTHETIC_MEAN, STD as SYNTHETIC_STD, make_synthetic

ENV_VAR = "ANYBIT_DATA"
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10", "cifar-100": "cifar100", "cifar_100": "cifar100"}

_INFO: dict[str, dict[str, Any]] = {
    "fashion-mnist": {"num_classes": 10, "in_channels": 1, "image_size": 32},
    "cifar10": {"num_classes": 10, "in_channels": 3, "image_size": 32},
    "cifar100": {"num_classes": 100, "in_channels": 3, "image_size": 32},
    "imagefolder": {"num_classes": None, "in_channels": 3, "image_size": 224},
    "synthetic": {"num_classes": 10, "in_channels": 3, "image_size": 32},
}
_OPTIONS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("image_size", "augment"),
    "cifar10": ("augment",),
    "cifar100": ("augment",),
    "imagefolder": ("image_size", "augment"),
    "synthetic": ("seed", "num_samples", "num_classes", "channels", "image_size", "augment"),
}
# Integer options: (smallest, largest) per dataset. ``augment`` (every dataset) is true/false.
_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "fashion-mnist": {"image_size": (28, 1024)},
    "imagefolder": {"image_size": (8, 1024)},
    "synthetic": {"seed": (0, 2**32 - 1), "num_samples": (1, 10_000_000), "num_classes": (1, 100_000),
                  "channels": (1, 64), "image_size": (1, 1024)},
}
SYNTHETIC_MAX_BYTES = 8 * 2**30   # images held in memory as uint8
_SPLITS: dict[str, tuple[str, ...]] = {name: ("train", "test") for name in DATASET_NAMES}
_SPLITS["imagefolder"] = ("train", "val", "test")

FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_FASHION_HOWTO = (
    "To get it: on Debian/Ubuntu run `apt-get install dataset-fashion-mnist` (installs into "
    "/usr/share/datasets/fashion-mnist); or download the four IDX files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the Fashion-MNIST "
    "project (https://github.com/zalandoresearch/fashion-mnist) into a directory DIR and pass --data-dir DIR "
    f"(data_dir=DIR) or set {ENV_VAR}=DIR."
)


def _cifar_howto(num_classes: int) -> str:
    return (
        f"To get it: on a machine with network access run `python -c \"import torchvision; "
        f"torchvision.datasets.CIFAR{num_classes}(root='DIR', download=True)\"` (it creates "
        f"DIR/{cifar.LAYOUTS[num_classes][0].folder}), copy DIR here if needed, and pass --data-dir DIR "
        f"(data_dir=DIR) or set {ENV_VAR}=DIR. The binary version (DIR/{cifar.LAYOUTS[num_classes][1].folder}) "
        "works too."
    )


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case-insensitive, with aliases such as ``fashion_mnist``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise UnknownDatasetError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}")
    return key


class DatasetOptionError(ValueError):
    """A dataset option that the dataset does not take, or a value outside its range."""


_BOOL_TEXT = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options of dataset ``name`` with their types and ranges checked (integers stay integers, ``augment``
    becomes a bool); raises :class:`DatasetOptionError` naming the option, the value and what is allowed."""
    unknown = sorted(set(options) - set(_OPTIONS[name]))
    if unknown:
        valid = ", ".join(_OPTIONS[name]) or "none"
        raise DatasetOptionError(f"dataset {name!r} does not take option(s) {', '.join(unknown)}; "
                                 f"valid options: {valid}")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key == "augment":
            if isinstance(value, bool):
                checked[key] = value
            elif isinstance(value, (int, str)) and str(value).strip().lower() in _BOOL_TEXT:
                checked[key] = _BOOL_TEXT[str(value).strip().lower()]
            else:
                raise DatasetOptionError(f"dataset option augment={value!r} must be true or false")
            continue
        low, high = _RANGES[name][key]
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise DatasetOptionError(f"{name} dataset option {key}={value!r} must be an integer in {low}..{high}")
        checked[key] = value
    if name == "synthetic":
        n = checked.get("num_samples", 512)
        size = n * checked.get("channels", 3) * checked.get("image_size", 32) ** 2
        if size > SYNTHETIC_MAX_BYTES:
            raise DatasetOptionError(f"synthetic dataset of {n} images of {checked.get('channels', 3)}x"
                                     f"{checked.get('image_size', 32)}^2 needs {size / 2**30:.1f} GiB; keep it under "
                                     f"{SYNTHETIC_MAX_BYTES // 2**30} GiB (fewer num_samples or a smaller image_size)")
    return checked


def dataset_info(name: str, **options: Any) -> dict[str, Any]:
    """``num_classes``, ``in_channels`` and ``image_size`` of a dataset without reading any file.

    Lets the CLI build a model before loading data; ``options`` are those ``load`` would get.
    ``num_classes`` is None for imagefolder, where only the directory knows it.
    """
    key = canonical_name(name)
    options = check_options(key, options)
    info = {"name": key, **_INFO[key]}
    if "image_size" in options:
        info["image_size"] = options["image_size"]
    if key == "synthetic":
        info["num_classes"] = options.get("num_classes", info["num_classes"])
        info["in_channels"] = options.get("channels", info["in_channels"])
    return info


def _search_roots(data_dir: str | os.PathLike | None) -> list[Path]:
    """An explicit ``data_dir`` is the only place looked in (it must exist); else ``$ANYBIT_DATA``."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            what = "is not a directory" if root.exists() else "does not exist"
            raise DatasetNotFoundError(f"--data-dir {root} {what}: give the directory that holds the dataset "
                                       f"(or leave --data-dir out to use ${ENV_VAR} and the system copies)")
        return [root]
    return [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def _find(
    candidates: Iterable[tuple[Path, Sequence[tuple[str, ...]], Any]],
) -> tuple[Path | None, list[Path], Any, list[str]]:
    """First candidate directory holding every required file (each given as alternative names), and what was searched."""
    searched: list[str] = []
    seen: set[Path] = set()
    for directory, required, tag in candidates:
        if directory in seen:
            continue
        seen.add(directory)
        if not directory.is_dir():
            searched.append(f"{directory} (no such directory)")
            continue
        found = [next((directory / n for n in names if (directory / n).is_file()), None) for names in required]
        if all(p is not None for p in found):
            return directory, found, tag, searched
        missing = [names[0] for names, p in zip(required, found) if p is None]
        searched.append(f"{directory} (missing {', '.join(missing)})")
    return None, [], None, searched


def _not_found(title: str, searched: list[str], howto: str) -> DatasetNotFoundError:
    where = "; ".join(searched) or f"nothing (no data_dir given and {ENV_VAR} is not set)"
    return DatasetNotFoundError(f"{title} not found. Looked in: {where}. {howto}")


def _load_fashion(split: str, data_dir: str | os.PathLike | None, augment: bool, image_size: int = 32) -> ImageDataset:
    image_size = int(image_size)
    if image_size < 28:
        raise ValueError(f"fashion-mnist image_size must be >= 28 (images are 28x28, padded with zeros), got {image_size}")
    prefix = "train" if split == "train" else "t10k"
    required = [(f"{prefix}-{kind}-ubyte.gz", f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
    dirs = [d for root in _search_roots(data_dir) for d in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw")]
    if data_dir is None:                        # an explicit directory is used or refused, never replaced
        dirs.append(Path(FASHION_MNIST_SYSTEM_DIR))
    directory, paths, _, searched = _find((d, required, None) for d in dirs)
    if directory is None:
        raise _not_found(f"Fashion-MNIST ({split} split)", searched, _FASHION_HOWTO)
    images_path, labels_path = paths
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DatasetFormatError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DatasetFormatError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    if len(labels) and labels.max() >= 10:
        raise DatasetFormatError(f"{labels_path}: label {labels.max()} out of range 0..9")
    pad = image_size - 28
    tensor = torch.from_numpy(images).unsqueeze(1)
    if pad:
        tensor = torch.nn.functional.pad(tensor, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return ImageDataset(
        tensor, torch.from_numpy(labels.astype("int64")), name="fashion-mnist", split=split, num_classes=10,
        mean=FASHION_MEAN, std=FASHION_STD, augment=augment, crop_padding=2, source=str(directory),
    )


def _load_cifar(num_classes: int, split: str, data_dir: str | os.PathLike | None, augment: bool) -> ImageDataset:
    candidates = []
    for root in _search_roots(data_dir):
        for layout in cifar.LAYOUTS[num_classes]:
            required = [(name,) for name in layout.files[split]]
            if root.name == layout.folder:
                candidates.append((root, required, layout))
            candidates.append((root / layout.folder, required, layout))
    directory, _, layout, searched = _find(candidates)
    if directory is None:
        raise _not_found(f"CIFAR-{num_classes} ({split} split)", searched, _cifar_howto(num_classes))
    images, labels = cifar.read_split(directory, layout, split, num_classes)
    mean, std = CIFAR_STATS[num_classes]
    return ImageDataset(
        torch.from_numpy(images), torch.from_numpy(labels), name=f"cifar{num_classes}", split=split,
        num_classes=num_classes, mean=mean, std=std, augment=augment, crop_padding=4, source=str(directory),
    )


IMAGEFOLDER_SMALL = 96   # image_size up to this: CIFAR-style transforms; above: ImageNet-style


def imagefolder_transforms(image_size: int, augment: bool) -> list:
    """The transforms of ``imagefolder`` for ``image_size``: large images the ImageNet way (evaluation: resize to
    256/224 of the size and centre-crop; training: RandomResizedCrop and flip), small ones (up to
    :data:`IMAGEFOLDER_SMALL` pixels) the CIFAR way (resize the shorter side to the size and centre-crop,
    which leaves images of that size untouched; training adds a random crop with padding of 1/8 and a flip)."""
    from torchvision import transforms

    if image_size > IMAGEFOLDER_SMALL:
        if augment:
            return [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
        return [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    steps = [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    if augment:
        steps += [transforms.RandomCrop(image_size, padding=max(1, image_size // 8)), transforms.RandomHorizontalFlip()]
    return steps


def _load_imagefolder(split: str, data_dir: str | os.PathLike | None, augment: bool, image_size: int = 224) -> ImageFolderDataset:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    layout = "DIR/{train,val}/<class>/<image files>"
    if data_dir is None:
        raise DatasetNotFoundError(f"imagefolder needs a directory: pass --data-dir DIR (data_dir=DIR) laid out as {layout}")
    root = _search_roots(data_dir)[0]
    names = ("test", "val") if split == "test" else (split,)
    candidates = [root / n for n in names]
    directory = next((d for d in candidates if d.is_dir()), None)
    if directory is None:
        looked = "; ".join(f"{d} (no such directory)" for d in candidates)
        raise DatasetNotFoundError(f"imagefolder {split} split not found. Looked in: {looked}. Expected layout: {layout}")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    steps = imagefolder_transforms(image_size, augment)
    try:
        folder = ImageFolder(str(directory), transform=transforms.Compose([*steps, transforms.ToTensor(), normalize]))
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"imagefolder {split} split in {directory}: {e}. Expected layout: {layout}") from e
    return ImageFolderDataset(folder, split=split, image_size=image_size, augment=augment)


def _load_synthetic(split: str, data_dir: str | os.PathLike | None, augment: bool, **options: Any) -> ImageDataset:
    images, labels = make_synthetic(split, **options)
    channels = images.shape[1]
    return ImageDataset(
        images, labels, name="synthetic", split=split, num_classes=int(options.get("num_classes", 10)),
        mean=(SYNTHETIC_MEAN,) * channels, std=(SYNTHETIC_STD,) * channels, augment=augment, crop_padding=4,
        source="synthetic",
    )


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    augment: bool | None = None,
    **options: Any,
) -> ImageDataset | ImageFolderDataset:
    """Load dataset ``name`` (``split`` train/test) as a Dataset of (normalised float image, int label).

    ``augment=None`` gives the standard augmentation for the train split (random crop + flip) and none for
    test; synthetic data is never augmented unless ``augment=True``, since its templates are not images.
    The option ``augment=False`` (``--data-option augment=false``) turns the train split's augmentation
    off (``True`` turns it on for synthetic); an explicit ``augment`` argument wins over it.
    """
    key = canonical_name(name)
    if split not in _SPLITS[key]:
        raise ValueError(f"unknown split {split!r} for dataset {key!r}: expected one of {', '.join(_SPLITS[key])}")
    options = check_options(key, options)
    if key == "synthetic" and data_dir is not None:
        raise DatasetOptionError(f"synthetic data is generated and reads no files, so --data-dir {data_dir} would be "
                                 f"ignored: drop --data-dir (data_dir=)")
    augment_option = options.pop("augment", None)
    if augment is not None and not isinstance(augment, bool):
        augment = check_options(key, {"augment": augment})["augment"]
    if augment is None:
        if split == "train" and augment_option is not None:
            augment = augment_option
        else:
            augment = split == "train" and key != "synthetic"
    if key == "fashion-mnist":
        return _load_fashion(split, data_dir, augment, **options)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(int(key[5:]), split, data_dir, augment)
    if key == "imagefolder":
        return _load_imagefolder(split, data_dir, augment, **options)
    return _load_synthetic(split, data_dir, augment, **options)
