"""Accuracy and loss of a model at one or several precisions."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .progress import progress
from .quant import precision


class ModelOutputError(ValueError):
    """A model's output holds no logits anybit can find."""


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face), the ``"logits"``
    entry of a dict, or the first element of a tuple or list."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ModelOutputError(
        f"the model returned {type(output).__name__}; expected logits: a tensor, an object with .logits, a dict "
        f"with a 'logits' entry, or a tuple whose first element is the logits"
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
             desc: str = "eval", quiet: bool = False) -> dict:
    """Top-1 accuracy (percent), mean cross-entropy and sample count at the model's current precision."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    start = time.perf_counter()
    try:
        for images, labels in progress(loader, desc=desc, quiet=quiet):
            images, labels = images.to(device), labels.to(device)
            logits = logits_of(model(images))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation data is empty")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total,
            "seconds": time.perf_counter() - start}


def evaluate_bits(model: nn.Module, loader: Iterable, bits: Iterable[int], device: str | torch.device = "cpu",
                  quiet: bool = False) -> dict[int, dict]:
    """:func:`evaluate` at each uniform bit-width in ``bits``; the model's precision is restored."""
    results = {}
    for b in bits:
        with precision(model, b):
            results[b] = evaluate(model, loader, device, desc=f"eval {b}-bit", quiet=quiet)
    return results


def evaluate_onnx(session, loader: Iterable, desc: str = "eval onnx", quiet: bool = False) -> dict:
    """:func:`evaluate` for an ONNX Runtime session (:func:`anybit.export.onnx_session`)."""
    correct, total, loss_sum = 0, 0, 0.0
    start = time.perf_counter()
    for images, labels in progress(loader, desc=desc, quiet=quiet):
        logits = session(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += labels.numel()
    if total == 0:
        raise ValueError("the evaluation data is empty")
    return {"accuracy": 100.0 * correct / total, "loss": loss_sum / total, "samples": total,
            "seconds": time.perf_counter() - start}
