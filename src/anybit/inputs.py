"""Model inputs as anybit handles them: one tensor, or a dict of tensors given as keyword arguments
(a tokenizer's ``BatchEncoding``: ``input_ids``, ``attention_mask``, ...), and their padding.

Every calibration loop runs the model through :func:`run_model`, which also records the batch's
padding mask (``attention_mask``) for the duration of the call, so that hooks on layers inside the
model can keep only the positions of real tokens (:func:`real_positions`): padding then enters no
activation range, no MSE search and no loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

import torch
from torch import nn

Inputs = torch.Tensor | dict[str, torch.Tensor]
"""A batch of model inputs: a tensor ``(N, ...)`` or a dict of tensors that share their first dimension."""

MASK_KEY = "attention_mask"
LABEL_KEYS = ("labels", "label")
_MASK: ContextVar[torch.Tensor | None] = ContextVar("anybit_token_mask", default=None)


class InputsError(ValueError):
    """Model inputs anybit cannot batch: a dict holding something other than tensors, or of mismatched sizes."""


def is_keyword_inputs(x) -> bool:
    return isinstance(x, Mapping) and not isinstance(x, torch.Tensor)


def as_inputs(batch: Mapping) -> dict[str, torch.Tensor]:
    """A tokenizer output (dict, ``BatchEncoding``) as a plain dict of tensors, labels dropped."""
    out = {}
    for key, value in batch.items():
        if key in LABEL_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise InputsError(
                f"model input {key!r} is a {type(value).__name__}, not a tensor: tokenize with "
                f"return_tensors='pt' (or use anybit.data.text_calibration)")
        out[key] = value
    if not out:
        raise InputsError("a calibration batch is an empty dict: expected input_ids (and attention_mask) tensors")
    sizes = {k: v.shape[0] if v.dim() else None for k, v in out.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise InputsError(f"the tensors of a keyword batch differ in their first (sample) dimension: {sizes}")
    return out


def num_samples(x: Inputs) -> int:
    if is_keyword_inputs(x):
        return int(next(iter(x.values())).shape[0])
    return int(x.shape[0])


def take(x: Inputs, index) -> Inputs:
    """Samples ``index`` (a slice or an index tensor) of a batch."""
    if is_keyword_inputs(x):
        return {k: v[index] for k, v in x.items()}
    return x[index]


def to_device(x: Inputs, device) -> Inputs:
    if device is None:
        return x
    if is_keyword_inputs(x):
        return {k: v.to(device) for k, v in x.items()}
    return x.to(device)


def detach_cpu(x: Inputs) -> Inputs:
    if is_keyword_inputs(x):
        return {k: v.detach().cpu() for k, v in x.items()}
    return x.detach().cpu()


def chunks(x: Inputs, batch_size: int, device=None) -> Iterator[Inputs]:
    """``x`` in consecutive chunks of ``batch_size`` samples, moved to ``device``. Keyword batches are
    trimmed to their longest real sequence in each chunk (less padding to compute on)."""
    for start in range(0, num_samples(x), batch_size):
        yield to_device(trim_padding(take(x, slice(start, start + batch_size))), device)


def trim_padding(x: Inputs) -> Inputs:
    """Drop trailing positions that are padding in every sample of a keyword batch (right padding)."""
    if not is_keyword_inputs(x) or MASK_KEY not in x or x[MASK_KEY].dim() != 2:
        return x
    mask = x[MASK_KEY]
    used = mask.bool().any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    if length == mask.shape[1]:
        return x
    seq = mask.shape[1]
    return {k: (v[:, :length] if v.dim() >= 2 and v.shape[1] == seq else v) for k, v in x.items()}


def concat(parts: list[Inputs]) -> Inputs:
    """Batches joined along the sample dimension; keyword batches are right-padded with zeros to a common
    sequence length (their ``attention_mask`` marks the padding)."""
    if not is_keyword_inputs(parts[0]):
        return torch.cat(parts)
    keys = list(parts[0])
    if any(list(p) != keys for p in parts):
        raise InputsError(f"keyword batches have different keys: {sorted({k for p in parts for k in p})}")
    out = {}
    for key in keys:
        tensors = [p[key] for p in parts]
        if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
            if not all(MASK_KEY in p for p in parts):
                raise InputsError(f"keyword batches differ in sequence length ({key}) and have no attention_mask "
                                  f"that would mark the padding: pad them to one length")
            length = max(t.shape[1] for t in tensors)
            tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


def token_mask(x: Inputs) -> torch.Tensor | None:
    """The ``(N, T)`` boolean mask of real (non-padding) tokens of a keyword batch, or ``None``."""
    if is_keyword_inputs(x) and isinstance(x.get(MASK_KEY), torch.Tensor) and x[MASK_KEY].dim() == 2:
        return x[MASK_KEY].bool()
    return None


def call(model: nn.Module, x: Inputs):
    """``model(**x)`` for keyword inputs, ``model(x)`` for a tensor."""
    return model(**x) if is_keyword_inputs(x) else model(x)


def run_model(model: nn.Module, x: Inputs):
    """:func:`call`, with the batch's padding mask visible to :func:`real_positions` during the call."""
    with padding_mask(token_mask(x)):
        return call(model, x)


@contextlib.contextmanager
def padding_mask(mask: torch.Tensor | None):
    """Make ``mask`` (``(N, T)``, True at real tokens) the one :func:`real_positions` applies."""
    handle = _MASK.set(mask)
    try:
        yield
    finally:
        _MASK.reset(handle)


def current_mask() -> torch.Tensor | None:
    return _MASK.get()


def real_positions(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of ``t`` at real tokens: ``t[mask]`` (shape ``(n_tokens, ...)``) when ``t`` starts with the
    ``(N, T)`` dimensions of the current padding mask; ``t`` unchanged otherwise (images, pooled vectors,
    tensor inputs)."""
    mask = current_mask() if mask is None else mask
    if mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return t
    return t[mask.to(t.device)]


def real_token_ids(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """For the rows :func:`real_positions` keeps, the sample each comes from (``None`` when it keeps ``t``)."""
    mask = current_mask() if mask is None else mask
    if mask is None or t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape):
        return None
    return mask.nonzero()[:, 0]
