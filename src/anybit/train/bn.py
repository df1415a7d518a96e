"""BatchNorm statistics: the final re-estimation at the end of training, re-calibration for bit-widths a
switchable-BN (Any-Precision) model was not trained at, and, temporarily, for one bit-width of a
shared-BN (emqnet) model."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..quant import SwitchableBatchNorm, bn_state, check_bits, precision, precision_key, restore_bn_state
from .methods import nearest_bits


class NoSwitchableBNError(ValueError):
    """BN re-calibration was asked for a model whose BatchNorm is shared by all bit-widths, or that has none."""


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, SwitchableBatchNorm)) for m in model.modules())


def switchable_bns(model: nn.Module) -> list[SwitchableBatchNorm]:
    return [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]


def bn_bits(model: nn.Module) -> list[int]:
    """Bit-widths that have their own BatchNorm in a switchable-BN model ([] for shared BN)."""
    bns = switchable_bns(model)
    return sorted(int(k) for k in bns[0].bns.keys() if k.isdigit()) if bns else []


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    bits: int,
    batches: int = 20,
    source: int | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> dict:
    """Give a switchable-BN model BatchNorm statistics for ``bits``, a precision it was not trained at.

    Adds a BatchNorm for ``bits`` to every switchable BN, initialised (affine terms and statistics)
    from the nearest trained bit-width (or ``source``), then re-estimates its running mean and
    variance as the cumulative average over ``batches`` batches of ``loader`` run at ``bits``. The
    rest of the model is frozen: eval mode, no gradients, other BatchNorms untouched. A bit-width
    that already has a BatchNorm is left alone unless ``overwrite``. Returns what it did and how long
    it took (``seconds``).
    """
    bits = check_bits(bits, "bits")
    bns = switchable_bns(model)
    if not _has_batchnorm(model):
        raise NoSwitchableBNError(f"this model ({type(model).__name__}) has no BatchNorm: there are no statistics to "
                                  f"re-calibrate, and every bit-width runs as it is")
    if not bns:
        raise NoSwitchableBNError(
            "this model has one BatchNorm shared by all bit-widths (emqnet/dedicated): every bit-width "
            "already runs with it, no re-calibration needed"
        )
    if batches < 1:
        raise ValueError(f"batches={batches} must be at least 1")
    key = precision_key(bits, bits)
    trained = bn_bits(model)
    if key in bns[0].bns and not overwrite:
        return {"bits": bits, "recalibrated": False, "reason": "already has its own BatchNorm",
                "batches": 0, "samples": 0, "seconds": 0.0}
    if source is None:
        source = nearest_bits(bits, trained)
    if str(source) not in bns[0].bns:
        raise ValueError(f"source={source} has no BatchNorm in this model: it has {trained}")
    if device is None:
        device = next(model.parameters()).device

    start = time.perf_counter()
    for bn in bns:
        if key not in bn.bns:
            bn.add(key, str(source))
    with _cumulative_statistics(model, [bn.bns[key] for bn in bns]), precision(model, bits):
        done, samples = _run_batches(model, loader, batches, device)
    return {"bits": bits, "recalibrated": True, "source": source, "batches": done, "samples": samples,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def reestimate_bn(
    model: nn.Module, loader: Iterable, bits: Iterable[int], batches: int = 20,
    device: str | torch.device | None = None,
) -> dict:
    """Replace the running statistics of every BatchNorm of ``model`` by their exact average over
    ``batches`` batches of ``loader`` run at each of ``bits``, every bit-width weighted equally.

    The statistics a BatchNorm keeps during training are a momentum average over batches taken while
    the weights still moved, and, when the BatchNorm is shared by all bit-widths, a mix that leans
    towards whichever bit-width ran last in each step. One pass at the end of training replaces them
    (a shared BatchNorm still holds one set for all bit-widths; a switchable one, and a per-precision one,
    a set per bit-width).
    Weights are untouched; a model without BatchNorm is not run at all. Returns ``batches``/``samples``
    per bit-width and ``seconds``.
    """
    bits = [check_bits(b, "bits") for b in bits]
    if batches < 1:
        raise ValueError(f"batches={batches} must be at least 1")
    if device is None:
        device = next(model.parameters()).device
    targets = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not targets:   # nothing to re-estimate (e.g. a LayerNorm model): no forwards
        return {"bits": {b: {"batches": 0, "samples": 0} for b in bits}, "seconds": 0.0}
    start = time.perf_counter()
    done: dict[int, dict] = {}
    with _cumulative_statistics(model, targets):
        for b in bits:
            with precision(model, b):
                n, samples = _run_batches(model, loader, batches, device)
            done[b] = {"batches": n, "samples": samples}
    return {"bits": done, "seconds": time.perf_counter() - start}


@contextmanager
def shared_bn_recalibrated(
    model: nn.Module, loader: Iterable, bits: int, batches: int = 20, device: str | torch.device | None = None
) -> Iterator[dict]:
    """Inside the ``with`` block, every BatchNorm of ``model`` holds statistics re-estimated at ``bits``.

    For shared-BN models (emqnet): one BatchNorm serves all bit-widths with running statistics
    averaged over the trained ones, which fit a bit-width only as well as weight bias correction
    aligns its pre-BN activations (short runs align them less). This re-estimates the statistics
    as a cumulative average over ``batches`` batches run at ``bits`` and restores the saved ones on
    exit, so the checkpoint is unchanged. Yields what it did (``batches``, ``samples``, ``seconds``).
    """
    bits = check_bits(bits, "bits")
    if batches < 1:
        raise ValueError(f"batches={batches} must be at least 1")
    targets = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not targets:
        raise NoSwitchableBNError(f"this model ({type(model).__name__}) has no BatchNorm: there are no statistics to "
                                  f"re-estimate at {bits} bits")
    if device is None:
        device = next(model.parameters()).device
    saved = bn_state(targets)
    was_training = model.training
    start = time.perf_counter()
    try:
        with torch.no_grad(), _cumulative_statistics(model, targets), precision(model, bits):
            done, samples = _run_batches(model, loader, batches, device)
        model.eval()
        yield {"bits": bits, "recalibrated": True, "batches": done, "samples": samples,
               "seconds": time.perf_counter() - start}
    finally:
        restore_bn_state(targets, saved)
        model.train(was_training)


@contextmanager
def _cumulative_statistics(model: nn.Module, targets: list[nn.Module]) -> Iterator[None]:
    """Inside: ``targets`` start from empty running statistics and average every batch they see
    equally, the rest of ``model`` in eval mode; momentum and the model's mode are restored on exit, and so
    are the statistics of every set that saw no batch (a per-precision set whose precision did not run)."""
    saved = [t.momentum for t in targets]
    saved_stats = bn_state(targets)
    was_training = model.training
    model.eval()
    try:
        for t in targets:
            t.reset_running_stats()
            t.momentum = None  # cumulative average over the batches seen
            t.train()
        yield
    finally:
        for t, momentum in zip(targets, saved):
            t.momentum = momentum
        restore_bn_state(targets, saved_stats, only_unvisited=True)
        model.train(was_training)


def _run_batches(model: nn.Module, loader: Iterable, batches: int, device) -> tuple[int, int]:
    """Forward the first ``batches`` batches of ``loader``; returns (batches run, samples)."""
    done = samples = 0
    for batch in loader:
        if done >= batches:
            break
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        model(images.to(device))
        samples += images.shape[0]
        done += 1
    if done == 0:
        raise ValueError("the BatchNorm statistics data is empty: give a loader with at least one batch")
    return done, samples
