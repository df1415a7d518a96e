"""Dataset classes: in-memory uint8 images normalised and augmented in batches, and an ImageFolder wrapper."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a batch (B, C, H, W), crop each image back at a random offset and flip half of them.

    Batched torch ops with the default generator, so ``torch.manual_seed`` and DataLoader seeding control it.
    """
    b, c, h, w = images.shape
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (b,))
        dx = torch.randint(0, 2 * padding + 1, (b,))
        rows = dy[:, None] + torch.arange(h)
        cols = dx[:, None] + torch.arange(w)
        images = padded[
            torch.arange(b)[:, None, None, None],
            torch.arange(c)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    flip = torch.rand(b) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def _subset_indices(size: int, n: int, seed: int) -> torch.Tensor:
    if not 0 < n <= size:
        raise ValueError(f"subset size must be between 1 and the dataset size {size}, got {n}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:n].sort().values


class ImageDataset(Dataset):
    """uint8 images (N, C, H, W) and int64 labels held in memory, normalised (and augmented) on access.

    Storing uint8 keeps CIFAR-10 at 150 MB instead of 600 MB; ``__getitems__`` lets a DataLoader
    transform a whole batch with tensor ops instead of per-sample Python.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        name: str,
        split: str,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        crop_padding: int = 4,
        source: str = "",
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be uint8 (N, C, S, S), got {images.dtype} {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must have shape ({images.shape[0]},), got {tuple(targets.shape)}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean and std need {images.shape[1]} values, got {len(mean)} and {len(std)}")
        self.images = images.contiguous()
        self.targets = targets.to(torch.int64)
        self.name, self.split, self.source = name, split, source
        self.num_classes = num_classes
        self.in_channels = images.shape[1]
        self.image_size = images.shape[2]
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment = augment
        self.crop_padding = crop_padding
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __len__(self) -> int:
        return self.images.shape[0]

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Turn a uint8 batch into normalised float32, augmenting it first when ``augment`` is on."""
        if self.augment:
            images = random_crop_flip(images, self.crop_padding)
        return images.float().mul_(self._scale).sub_(self._shift)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return self.transform(self.images[index].unsqueeze(0))[0], int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Return ``[(image, label), ...]`` for a batch of indices, transformed in one batched pass."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = self.transform(self.images[idx])
        return list(zip(batch.unbind(0), self.targets[idx].tolist()))

    def subset(self, n: int, seed: int = 0) -> ImageDataset:
        """A fixed random subset of ``n`` samples (same type and settings), for quick runs."""
        idx = _subset_indices(len(self), n, seed)
        part = copy.copy(self)
        part.images, part.targets = self.images[idx].contiguous(), self.targets[idx]
        return part

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"shape=({self.in_channels}, {self.image_size}, {self.image_size}), classes={self.num_classes}, "
            f"augment={self.augment}, source={self.source!r})"
        )


class ImageFolderDataset(Dataset):
    """torchvision ImageFolder with ImageDataset's attributes (num_classes, targets, subset, ...)."""

    def __init__(
        self, folder: ImageFolder, *, split: str, image_size: int, augment: bool, indices: Sequence[int] | None = None
    ) -> None:
        self.folder = folder
        self.indices = list(range(len(folder))) if indices is None else list(indices)
        self.name, self.split, self.source = "imagefolder", split, str(folder.root)
        self.num_classes = len(folder.classes)
        self.classes = list(folder.classes)
        self.in_channels = 3
        self.image_size = image_size
        self.augment = augment
        self.targets = torch.tensor([folder.targets[i] for i in self.indices], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self.indices[index]
        try:
            image, label = self.folder[i]
        except (OSError, ValueError, SyntaxError) as e:   # PIL: unidentified, truncated or malformed image
            from .errors import DatasetFormatError

            path = self.folder.samples[i][0]
            detail = type(e).__name__ if "<" in str(e) else f"{type(e).__name__}: {e}"
            raise DatasetFormatError(f"{path} is not a readable image ({detail}); remove or replace it") from e
        return image, int(label)

    def subset(self, n: int, seed: int = 0) -> ImageFolderDataset:
        """A fixed random subset of ``n`` images, for quick runs."""
        idx = _subset_indices(len(self), n, seed).tolist()
        return ImageFolderDataset(
            self.folder, split=self.split, image_size=self.image_size, augment=self.augment,
            indices=[self.indices[i] for i in idx],
        )

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(split={self.split!r}, n={len(self)}, classes={self.num_classes}, "
            f"image_size={self.image_size}, augment={self.augment}, source={self.source!r})"
        )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling (and worker seeds) come from ``seed`` when given, so runs repeat."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
