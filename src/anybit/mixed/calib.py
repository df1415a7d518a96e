"""Calibration data in the forms users have it, turned into a fixed list of batches, and fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..evaluation import logits_of
from ..quant import FLOAT_BITS, precision
from .errors import MixedPrecisionError

Batch = tuple[torch.Tensor, torch.Tensor | None]
LOSSES = ("kl", "ce")


def calibration_batches(data, batch_size: int = 256, device: str | torch.device | None = None) -> list[Batch]:
    """``[(inputs, labels or None), ...]`` on ``device`` from a tensor of inputs, an ``(inputs, labels)``
    pair of tensors, a Dataset of ``(input, label)`` samples or an iterable of batches (a DataLoader).

    The batches are held in memory: calibration sets are small (hundreds to a few thousand samples)
    and every layer and option is measured on exactly the same data.
    """
    if batch_size < 1:
        raise MixedPrecisionError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, torch.Tensor):
        batches = [(x, None) for x in data.split(batch_size)]
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)
          and data[1].dim() == 1 and data[0].dim() > 1 and data[0].shape[0] == data[1].shape[0]):
        batches = list(zip(data[0].split(batch_size), data[1].split(batch_size)))
    elif isinstance(data, Dataset) and not isinstance(data, DataLoader) and hasattr(data, "__len__"):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        batches = [_split_batch(b) for b in loader]
    elif isinstance(data, Iterable):
        batches = [_split_batch(b) for b in data]
    else:
        raise MixedPrecisionError(
            f"calibration data of type {type(data).__name__} is not supported: expected a tensor of inputs, "
            f"an (inputs, labels) pair of tensors, a Dataset or an iterable of batches (e.g. a DataLoader)"
        )
    if not batches or sum(x.shape[0] for x, _ in batches) == 0:
        raise MixedPrecisionError("the calibration data is empty: give at least one sample")
    if device is not None:
        batches = [(x.to(device), None if y is None else y.to(device)) for x, y in batches]
    return batches


def _split_batch(batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, dict) and isinstance(batch.get("input"), torch.Tensor):
        return batch["input"], batch.get("label")
    raise MixedPrecisionError(
        f"a calibration batch of type {type(batch).__name__} is not supported: expected a tensor or an "
        f"(inputs, labels) tuple"
    )


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(str(t.dtype).encode())
    h.update(str(t.numel()).encode())
    h.update(t.view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's tensors (parameters and buffers).

    Per-bit-width calibrated ranges (``*.ranges.*``, written by a ``layer_setup`` such as min/max range
    calibration) are left out: they are a product of the measurement, not an input to it.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if ".ranges." in f".{key}":
            continue
        h.update(key.encode())
        _hash_tensor(h, value)
    return h.hexdigest()


def data_fingerprint(batches: list[Batch]) -> str:
    """SHA-256 of the calibration inputs and labels, in order."""
    h = hashlib.sha256()
    for x, y in batches:
        _hash_tensor(h, x)
        if y is not None:
            _hash_tensor(h, y)
    return h.hexdigest()


@torch.no_grad()
def float_targets(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """The float model's output log-probabilities on each batch: the targets of the KL loss."""
    with precision(model, FLOAT_BITS):
        return [F.log_softmax(logits_of(model(x)).float(), dim=-1) for x, _ in batches]


@torch.no_grad()
def dataset_loss(model: nn.Module, batches: list[Batch], targets: list[torch.Tensor], loss: str) -> float:
    """Mean loss per sample of ``model`` as it is set now: ``"kl"`` to ``targets`` or ``"ce"`` to the labels."""
    total, samples = 0.0, 0
    for (x, y), t in zip(batches, targets):
        logits = logits_of(model(x)).float()
        if loss == "ce":
            total += F.cross_entropy(logits, y, reduction="sum").item()
        else:
            total += F.kl_div(F.log_softmax(logits, dim=-1), t, log_target=True, reduction="sum").item()
        samples += x.shape[0]
    return total / samples


def check_loss(loss: str, batches: list[Batch]) -> None:
    """A clear error unless ``loss`` is known and, for ``"ce"``, every batch has labels."""
    if loss not in LOSSES:
        raise MixedPrecisionError(f"loss={loss!r} is unknown: expected 'kl' (to the float outputs, no labels) or 'ce'")
    if loss == "ce" and any(y is None for _, y in batches):
        raise MixedPrecisionError("loss='ce' needs labels: give calibration data as (inputs, labels), or use loss='kl'")
