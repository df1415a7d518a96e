"""Calibration data in the forms users have it, turned into a fixed list of batches, and fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import inputs as mi
from ..evaluation import compared_output, output_discrepancy
from ..quant import FLOAT_BITS, precision
from .errors import MixedPrecisionError

Batch = tuple[torch.Tensor, torch.Tensor | None]
LOSSES = ("kl", "ce")


def calibration_batches(data, batch_size: int = 256, device: str | torch.device | None = None) -> list[Batch]:
    """``[(inputs, labels or None), ...]`` on ``device`` from a tensor of inputs, an ``(inputs, labels)``
    pair of tensors, a Dataset of ``(input, label)`` samples or an iterable of batches (a DataLoader),
    or keyword inputs (a dict / ``BatchEncoding`` of tensors, one or an iterable of them: ``inputs`` is
    then a dict, and its ``attention_mask`` keeps padding out of the loss).

    The batches are held in memory: calibration sets are small (hundreds to a few thousand samples)
    and every layer and option is measured on exactly the same data.
    """
    if batch_size < 1:
        raise MixedPrecisionError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, torch.Tensor):
        batches = [(x, None) for x in data.split(batch_size)]
    elif mi.is_keyword_inputs(data):
        batches = [(x, None) for x in mi.chunks(_keyword(data), batch_size)]
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
    if not batches or sum(mi.num_samples(x) for x, _ in batches) == 0:
        raise MixedPrecisionError("the calibration data is empty: give at least one sample")
    if device is not None:
        batches = [(mi.to_device(x, device), None if y is None else y.to(device)) for x, y in batches]
    return batches


def _keyword(data) -> dict[str, torch.Tensor]:
    try:
        return mi.as_inputs(data)
    except mi.InputsError as e:
        raise MixedPrecisionError(str(e)) from e


def _split_batch(batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    if isinstance(batch, (tuple, list)) and batch and mi.is_keyword_inputs(batch[0]):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return _keyword(batch[0]), labels
    if isinstance(batch, dict) and isinstance(batch.get("input"), torch.Tensor):
        return batch["input"], batch.get("label")
    if mi.is_keyword_inputs(batch):
        labels = next((batch[k] for k in mi.LABEL_KEYS if isinstance(batch.get(k), torch.Tensor)), None)
        return _keyword(batch), labels
    raise MixedPrecisionError(
        f"a calibration batch of type {type(batch).__name__} is not supported: expected a tensor, an "
        f"(inputs, labels) tuple or a dict of keyword input tensors"
    )


def _hash_inputs(h, x) -> None:
    if mi.is_keyword_inputs(x):
        for key in sorted(x):
            h.update(key.encode())
            _hash_tensor(h, x[key])
    else:
        _hash_tensor(h, x)


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
        _hash_inputs(h, x)
        if y is not None:
            _hash_tensor(h, y)
    return h.hexdigest()


@torch.no_grad()
def float_targets(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """The float model's outputs on each batch (logits, or hidden states for a model without logits):
    the targets of the KL loss (see :func:`anybit.evaluation.compared_output`)."""
    with precision(model, FLOAT_BITS):
        return [compared_output(mi.run_model(model, x))[1].float() for x, _ in batches]


@torch.no_grad()
def dataset_loss(model: nn.Module, batches: list[Batch], targets: list[torch.Tensor], loss: str) -> float:
    """Mean loss of ``model`` as it is set now: ``"kl"`` to ``targets`` (per sample; for a model without
    logits the relative squared error of its hidden states per real token) or ``"ce"`` to the labels."""
    total, count = 0.0, 0
    for (x, y), t in zip(batches, targets):
        kind, out = compared_output(mi.run_model(model, x))
        if loss == "ce":
            if kind != "logits":
                raise MixedPrecisionError("loss='ce' needs a model that outputs logits; use loss='kl'")
            total += F.cross_entropy(out.float(), y, reduction="sum").item()
            count += mi.num_samples(x)
        else:
            s, c = output_discrepancy(out.float(), t, kind, mi.token_mask(x))
            total, count = total + s.item(), count + c
    return total / max(count, 1)


def check_loss(loss: str, batches: list[Batch]) -> None:
    """A clear error unless ``loss`` is known and, for ``"ce"``, every batch has labels."""
    if loss not in LOSSES:
        raise MixedPrecisionError(f"loss={loss!r} is unknown: expected 'kl' (to the float outputs, no labels) or 'ce'")
    if loss == "ce" and any(y is None for _, y in batches):
        raise MixedPrecisionError("loss='ce' needs labels: give calibration data as (inputs, labels), or use loss='kl'")
