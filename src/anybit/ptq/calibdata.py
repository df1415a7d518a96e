"""Calibration data: any dataset, loader or tensor, reduced to one tensor of inputs (labels dropped)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import CalibrationDataError

CalibData = torch.Tensor | Dataset | DataLoader | Iterable


def _inputs_of(batch) -> torch.Tensor:
    """The input part of a batch: ``x``, ``(x, y)``, ``[x, y]`` or ``{"x"|"input"|"image": x}``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("x", "input", "inputs", "image", "images", "pixel_values"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise CalibrationDataError(
        f"a calibration batch is a {type(batch).__name__}, not an input tensor: expected batches of x, "
        f"(x, y) or [x, y] (labels are not needed)"
    )


def _random_indices(size: int, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(size, generator=generator)[:n].sort().values


def _too_few(n: int, have: int, what: str) -> CalibrationDataError:
    return CalibrationDataError(
        f"a calibration set of {n} samples was asked for but the {what} has only {have}: "
        f"ask for at most {have} (--calib-size {have}) or give more data"
    )


def calibration_tensor(data: CalibData, num_samples: int | None = None, seed: int = 0,
                       batch_size: int = 256) -> torch.Tensor:
    """All calibration inputs as one CPU tensor ``(N, ...)``; labels, if any, are dropped.

    ``data`` is a tensor of inputs, a Dataset of ``x`` or ``(x, y)`` items, or any iterable of
    batches (a DataLoader). ``num_samples`` keeps a seeded random subset (tensor, dataset) or the
    first ``num_samples`` inputs (iterables), and fails if there are fewer.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) < 1):
        raise CalibrationDataError(f"num_samples={num_samples!r} must be a positive integer (or None for all)")
    if isinstance(data, torch.Tensor):
        x = data
        if x.dim() == 0 or x.shape[0] == 0:
            raise CalibrationDataError("the calibration tensor is empty: expected inputs of shape (N, ...), N >= 1")
        if num_samples is not None:
            if num_samples > x.shape[0]:
                raise _too_few(num_samples, x.shape[0], "tensor")
            if num_samples < x.shape[0]:
                x = x[_random_indices(x.shape[0], num_samples, seed)]
        return x.detach().cpu()
    if isinstance(data, Dataset) and hasattr(data, "__len__") and not isinstance(data, DataLoader):
        size = len(data)
        if size == 0:
            raise CalibrationDataError("the calibration dataset is empty")
        if num_samples is not None and num_samples > size:
            raise _too_few(num_samples, size, "dataset")
        if num_samples is not None and num_samples < size:
            if hasattr(data, "subset"):
                data = data.subset(num_samples, seed)
            else:
                data = torch.utils.data.Subset(data, _random_indices(size, num_samples, seed).tolist())
        return _concat(DataLoader(data, batch_size=batch_size, shuffle=False), None, "dataset")
    if isinstance(data, Iterable):
        return _concat(data, num_samples, "data loader")
    raise CalibrationDataError(
        f"calibration data of type {type(data).__name__} is not supported: expected a tensor of inputs, "
        f"a Dataset or a DataLoader/iterable of batches"
    )


def _concat(batches: Iterable, limit: int | None, what: str) -> torch.Tensor:
    parts, count = [], 0
    for batch in batches:
        x = _inputs_of(batch).detach().cpu()
        if x.dim() == 0:
            raise CalibrationDataError(f"a calibration batch is a scalar: expected inputs of shape (B, ...)")
        parts.append(x)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise CalibrationDataError(f"the calibration {what} yielded no samples")
    if limit is not None and count < limit:
        raise _too_few(limit, count, what)
    try:
        x = torch.cat(parts)
    except RuntimeError as e:
        raise CalibrationDataError(
            f"calibration batches do not stack into one tensor ({e}): give inputs of one shape") from e
    return x[:limit] if limit is not None else x


def batches(x: torch.Tensor, batch_size: int, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """``x`` in consecutive chunks of ``batch_size``, moved to ``device``."""
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size]
        yield chunk.to(device) if device is not None else chunk
