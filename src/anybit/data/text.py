"""Text calibration: sentences (a list, or a file with one sample per line) tokenized into one batch of
keyword inputs for ``model(**inputs)`` -- ``input_ids``, ``attention_mask`` (and ``token_type_ids``) --
padded to the longest sample. The attention mask is what keeps padding out of every activation
range, MSE search and loss in :mod:`anybit.ptq` and :mod:`anybit.mixed`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch


DEFAULT_MAX_LENGTH = 128


class TextDataError(ValueError):
    """Calibration text that is missing, empty or cannot be tokenized."""


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped: one sample per line."""
    p = Path(path)
    if not p.is_file():
        raise TextDataError(f"no text file at {path}: expected a UTF-8 file with one sample (sentence) per line")
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise TextDataError(f"{path} is not UTF-8 text ({e}); give a UTF-8 file with one sample per line") from e
    lines = [line for line in lines if line]
    if not lines:
        raise TextDataError(f"{path} holds no text: expected one sample (sentence) per line")
    return lines


def text_calibration(texts: Sequence[str] | str | os.PathLike, tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH,
                     num_samples: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Calibration inputs for a text model: ``texts`` (a list of strings, or the path of a text file with one
    sample per line) tokenized by ``tokenizer`` (a Hugging Face tokenizer, or the path of a model directory
    holding one), truncated to ``max_length`` tokens and padded to the longest. Returns a dict of CPU tensors
    (``input_ids``, ``attention_mask``, ...) that :func:`anybit.ptq.quantize`, :func:`anybit.ptq.adaquant`,
    :func:`anybit.calibrate_activations` and :func:`anybit.mixed.sensitivity` accept as calibration data.
    ``num_samples`` keeps a seeded random subset of that many texts. A tokenizer without a padding token
    (GPT-2) pads with its end-of-sequence token (the attention mask marks it as padding either way).
    """
    if isinstance(texts, (str, os.PathLike)):
        texts = read_lines(texts)
    if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)) or not all(isinstance(t, str) for t in texts):
        raise TextDataError("texts must be a list of strings or the path of a text file with one sample per line")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TextDataError("no calibration text: give at least one non-empty string")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise TextDataError(f"max_length={max_length!r} is invalid: expected a positive number of tokens")
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise TextDataError(f"num_samples={num_samples!r} is invalid: expected a positive integer or None")
        if num_samples > len(texts):
            raise TextDataError(f"{num_samples} calibration texts were asked for but there are only {len(texts)}: "
                                f"ask for at most {len(texts)} or give more text")
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:num_samples]
        texts = [texts[i] for i in sorted(order.tolist())]
    if isinstance(tokenizer, (str, os.PathLike)):
        from ..models.hf import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    if not callable(tokenizer):
        raise TextDataError(f"tokenizer must be a Hugging Face tokenizer or a model directory, got "
                            f"{type(tokenizer).__name__}")
    if getattr(tokenizer, "pad_token", "") is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v for k, v in dict(encoded).items() if isinstance(v, torch.Tensor)}
    if "input_ids" not in batch or "attention_mask" not in batch:
        raise TextDataError(f"the tokenizer gave {sorted(batch)}: expected input_ids and attention_mask tensors")
    return batch


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of each sample's hidden states over its real tokens
    (the pooling of sentence-transformers models such as all-MiniLM-L6-v2)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
