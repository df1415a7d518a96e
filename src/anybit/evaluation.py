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


OUTPUT_KINDS = ("logits", "hidden")


def compared_output(output) -> tuple[str, torch.Tensor]:
    """What post-training quantization compares in a model's output: ``("logits", logits)`` when the output
    holds logits (see :func:`logits_of`); otherwise, for a feature extractor (a Hugging Face
    ``BaseModelOutput`` without logits), ``("hidden", last_hidden_state)`` (or its first tensor)."""
    try:
        return "logits", logits_of(output)
    except ModelOutputError:
        pass
    hidden = output.get("last_hidden_state") if isinstance(output, dict) else getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor) and isinstance(output, dict):
        hidden = next((v for v in output.values() if isinstance(v, torch.Tensor)), None)
    if isinstance(hidden, torch.Tensor):
        return "hidden", hidden
    raise ModelOutputError(
        f"the model returned {type(output).__name__}; expected logits (a tensor, .logits, a 'logits' entry or a "
        f"tuple's first element) or hidden states (.last_hidden_state)"
    )


def align(reference: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``reference`` cut to ``out``'s sequence length (a batch trimmed of trailing padding)."""
    if reference.dim() >= 3 and out.dim() >= 3 and reference.shape[1] > out.shape[1]:
        return reference[:, :out.shape[1]]
    return reference


def output_discrepancy(out: torch.Tensor, reference: torch.Tensor, kind: str,
                       mask: torch.Tensor | None = None, temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """``(sum, count)`` of the per-item discrepancy between a quantized and a float output; their ratio is
    the mean. ``"logits"``: ``KL(softmax(reference) || softmax(out))`` per sample (per real token for
    ``(N, T, V)`` logits). ``"hidden"``: the relative squared error ``||h - h_float||² / ||h_float||²`` of each
    real token's hidden state. ``mask`` (``(N, T)``, True at real tokens) leaves padding out of both."""
    from .inputs import real_positions

    reference = align(reference, out).to(out.device, out.dtype)
    if mask is not None:
        out, reference = real_positions(out, mask), real_positions(reference, mask)
    if kind == "hidden":
        out, reference = out.reshape(-1, out.shape[-1]), reference.reshape(-1, reference.shape[-1])
        err = (out - reference).pow(2).sum(-1) / reference.pow(2).sum(-1).clamp_min(1e-12)
        return err.sum(), err.numel()
    if kind != "logits":
        raise ValueError(f"output kind {kind!r} is unknown: expected one of {list(OUTPUT_KINDS)}")
    log_p = F.log_softmax(out.reshape(-1, out.shape[-1]).float() / temperature, dim=-1)
    log_q = F.log_softmax(reference.reshape(-1, reference.shape[-1]).float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="sum"), log_p.shape[0]


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


@torch.no_grad()
def compare_outputs(model: nn.Module, reference: nn.Module, inputs, batch_size: int = 128,
                    device: str | torch.device | None = None) -> dict:
    """How closely ``model`` (a quantized copy) reproduces ``reference`` (the float model) on ``inputs`` (a
    tensor, or keyword inputs such as :func:`anybit.data.text_calibration` gives), both in eval mode.

    For logits: ``kl`` (mean per sample, as in PTQ) and ``top1_agreement`` (percent of samples whose arg-max
    class is the same). For hidden states: ``relative_error`` (per real token, as in PTQ) and ``cosine``, the
    mean cosine similarity of the two models' mean-pooled sentence embeddings (real tokens only).
    """
    from . import inputs as mi
    from .data.text import mean_pooled

    states = {m: m.training for m in (model, reference)}
    model.eval()
    reference.eval()
    total, count, cos_sum, agree, n = 0.0, 0, 0.0, 0, 0
    kind = None
    try:
        for x in mi.chunks(inputs, batch_size, device):
            kind, out = compared_output(mi.run_model(model, x))
            _, ref = compared_output(mi.run_model(reference, x))
            mask = mi.token_mask(x)
            s, c = output_discrepancy(out.float(), ref.float(), kind, mask)
            total, count = total + float(s), count + c
            if kind == "hidden":
                if mask is None:
                    mask = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
                a, b = mean_pooled(out.float(), mask), mean_pooled(ref.float(), mask)
                cos_sum += float(F.cosine_similarity(a, b, dim=-1).sum())
            elif out.dim() == 2:
                agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
            n += mi.num_samples(x)
    finally:
        for m, mode in states.items():
            m.train(mode)
    if kind == "hidden":
        return {"output": kind, "samples": n, "relative_error": total / max(count, 1), "cosine": cos_sum / max(n, 1)}
    return {"output": kind, "samples": n, "kl": total / max(count, 1),
            "top1_agreement": 100.0 * agree / max(n, 1) if out.dim() == 2 else None}
