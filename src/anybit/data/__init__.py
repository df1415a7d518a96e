"""Datasets: Fashion-MNIST (IDX files), CIFAR-10/100 (torchvision layout, safe unpickling), ImageFolder, synthetic.

``load(name, split)`` returns a Dataset of (normalised float32 CHW image, int label) with ``num_classes``,
``in_channels``, ``image_size``, ``targets`` and ``subset(n, seed)``; ``make_loader`` wraps it in a
seeded DataLoader; ``dataset_info`` gives shapes without reading files. ``text_calibration`` tokenizes
sentences (a list, or a file with one per line) into keyword inputs for calibrating a text model.
"""

from .datasets import ImageDataset, ImageFolderDataset, make_loader
from .errors import DatasetFormatError, DatasetNotFoundError, UnknownDatasetError
from .registry import DATASET_NAMES, dataset_info, load
from .text import TextDataError, mean_pooled, read_lines, text_calibration

__all__ = [
    "DATASET_NAMES", "DatasetFormatError", "DatasetNotFoundError", "ImageDataset", "ImageFolderDataset",
    "TextDataError", "UnknownDatasetError", "dataset_info", "load", "make_loader", "mean_pooled", "read_lines",
    "text_calibration",
]
