"""Calibration data: any dataset, loader or tensor, reduced to one tensor of inputs (labels dropped),
or for models called with keyword inputs (a tokenizer's output) to one dict of such tensors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, Dataset

from .. import inputs as mi
from ..inputs import Inputs
from .errors import CalibrationDataError

CalibData = torch.Tensor | Mapping | Dataset | DataLoader | Iterable

_SINGLE_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")


def _inputs_of(batch) -> Inputs:
    """The input part of a batch: ``x``, ``(x, y)``, ``[x, y]``, ``{"x"|"input"|"image": x}``, or a dict /
    ``BatchEncoding`` of keyword inputs (``input_ids``, ``attention_mask``, ...; labels dropped)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, (tuple, list)) and batch and mi.is_keyword_inputs(batch[0]):
        return _inputs_of(batch[0])
    if mi.is_keyword_inputs(batch):
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            for key in _SINGLE_INPUT_KEYS:
                if isinstance(batch.get(key), torch.Tensor):
                    return batch[key]
        try:
            return mi.as_inputs(batch)
        except mi.InputsError as e:
            raise CalibrationDataError(str(e)) from e
    raise CalibrationDataError(
        f"a calibration batch is a {type(batch).__name__}, not an input tensor: expected batches of x, (x, y), "
        f"[x, y] or a dict of keyword input tensors (a tokenizer's output; labels are not needed)"
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
                       batch_size: int = 256) -> Inputs:
    """All calibration inputs as one CPU tensor ``(N, ...)``; labels, if any, are dropped.

    ``data`` is a tensor of inputs, a Dataset of ``x`` or ``(x, y)`` items, or any iterable of
    batches (a DataLoader). ``num_samples`` keeps a seeded random subset (tensor, dataset) or the
    first ``num_samples`` inputs (iterables), and fails if there are fewer. Keyword inputs (a dict
    or ``BatchEncoding`` of ``input_ids``, ``attention_mask``, ...; a list or loader of them) give one
    dict of CPU tensors instead, right-padded to a common length; the model is called with
    ``model(**inputs)`` and the ``attention_mask`` keeps padding out of every range and loss.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or int(num_samples) < 1):
        raise CalibrationDataError(f"num_samples={num_samples!r} must be a positive integer (or None for all)")
    if mi.is_keyword_inputs(data):
        x = _inputs_of(data)
        if not mi.is_keyword_inputs(x):
            return calibration_tensor(x, num_samples, seed, batch_size)
        n = mi.num_samples(x)
        if n == 0:
            raise CalibrationDataError("the calibration inputs are empty: expected N >= 1 samples")
        if num_samples is not None:
            if num_samples > n:
                raise _too_few(num_samples, n, "keyword inputs")
            if num_samples < n:
                x = mi.take(x, _random_indices(n, num_samples, seed))
        return mi.detach_cpu(x)
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


def _concat(batches: Iterable, limit: int | None, what: str) -> Inputs:
    parts, count = [], 0
    for batch in batches:
        x = mi.detach_cpu(_inputs_of(batch))
        if not mi.is_keyword_inputs(x) and x.dim() == 0:
            raise CalibrationDataError(f"a calibration batch is a scalar: expected inputs of shape (B, ...)")
        if parts and mi.is_keyword_inputs(x) != mi.is_keyword_inputs(parts[0]):
            raise CalibrationDataError("calibration batches mix tensors and keyword inputs: give one kind")
        parts.append(x)
        count += mi.num_samples(x)
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise CalibrationDataError(f"the calibration {what} yielded no samples")
    if limit is not None and count < limit:
        raise _too_few(limit, count, what)
    try:
        x = mi.concat(parts)
    except (RuntimeError, mi.InputsError) as e:
        raise CalibrationDataError(
            f"calibration batches do not stack into one tensor ({e}): give inputs of one shape") from e
    return mi.take(x, slice(0, limit)) if limit is not None else x


def batches(x: Inputs, batch_size: int, device: torch.device | str | None = None) -> Iterator[Inputs]:
    """``x`` in consecutive chunks of ``batch_size`` samples, moved to ``device`` (keyword inputs trimmed of
    the padding no sample of a chunk needs)."""
    yield from mi.chunks(x, batch_size, device)
