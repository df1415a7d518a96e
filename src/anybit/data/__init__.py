"""Datasets: Fashion-MNIST (IDX files), CIFAR-10/100 (torchvision layout, safe unpickling), ImageFolder, synthetic.

``load(name, split)`` returns a Dataset of (normalised float32 CHW image, int label) with ``num_classes``,
``in_channels``, ``image_size``, ``targets`` and ``subset(n, seed)``; ``make_loader`` wraps it in a
seeded DataLoader; ``dataset_info`` gives shapes without reading files.
"""

from .datasets import ImageDataset, ImageFolderDataset, make_loader
from .errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from .registry import DATASET_NAMES, dataset_info, load

__all__ = [
    "DATASET_NAMES", "DatasetFormatError", "DatasetNotFoundError", "ImageDataset", "ImageFolderDataset",
    "UnknownDatasetError", "dataset_info", "load", "make_loader",
]
