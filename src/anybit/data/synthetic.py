"""Synthetic, learnable image data: one fixed smooth random template per class plus per-sample noise."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MEAN = 0.5
STD = 0.2
_TEMPLATE_SCALE = 40.0
_NOISE_SCALE = 30.0


def class_templates(seed: int, num_classes: int, channels: int, image_size: int) -> torch.Tensor:
    """Unit-variance smooth templates (K, C, S, S) derived from ``seed`` only, so train and test share them."""
    rng = np.random.default_rng([seed, 0])
    coarse = max(1, image_size // 4)
    low = torch.from_numpy(rng.standard_normal((num_classes, channels, coarse, coarse)))
    templates = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    flat = templates.flatten(1)
    flat = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)
    return flat.view_as(templates)


def make_synthetic(
    split: str,
    *,
    seed: int = 0,
    num_samples: int | None = None,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic uint8 images (N, C, S, S) and balanced labels; train and test use separate noise streams."""
    if num_samples is None:
        num_samples = 512 if split == "train" else 256
    for key, value in (("num_samples", num_samples), ("num_classes", num_classes), ("channels", channels),
                       ("image_size", image_size)):
        if int(value) < 1:
            raise ValueError(f"synthetic dataset option {key} must be >= 1, got {value}")
    templates = class_templates(seed, num_classes, channels, image_size)
    rng = np.random.default_rng([seed, 1 if split == "train" else 2])
    labels = torch.from_numpy(rng.permutation(np.arange(num_samples) % num_classes).astype(np.int64))
    noise = torch.from_numpy(rng.standard_normal((num_samples, channels, image_size, image_size)))
    pixels = 255.0 * MEAN + _TEMPLATE_SCALE * templates[labels] + _NOISE_SCALE * noise
    return pixels.round_().clamp_(0, 255).to(torch.uint8), labels
