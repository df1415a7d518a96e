"""Range initialisation: min/max or MSE-optimal clipping for weights (per channel) and activations
(per tensor), written into the quantizers with ``set_range(bits, ...)`` so they apply at that
bit-width only.

MSE search is a grid search over clipping ratios ``alpha``: the range ``[alpha*lo, alpha*hi]`` whose
quantization error ``||x - Q(x)||^2`` is smallest wins, for every weight channel separately and
for every layer input over a random sample of the calibration activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..inputs import Inputs, num_samples, real_positions, run_model
from ..progress import progress
from ..quant import FLOAT_BITS, QuantMultiheadAttention, precision, quant_layers
from ..quant.functional import minmax_scale_zero_point
from .calibdata import batches
from .errors import PTQError

RANGE_METHODS = ("minmax", "mse")
DEFAULT_RATIOS = torch.linspace(0.01, 1.0, 100)
"""Clipping ratios tried by the MSE search (1% steps of the min/max range)."""


def check_method(method: str) -> str:
    if method not in RANGE_METHODS:
        raise PTQError(f"range method {method!r} is unknown: expected one of {list(RANGE_METHODS)}")
    return method


def _grid_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-row mean squared quantization error of ``x`` (rows, K) on the given grids (rows,)."""
    s, z = scale[:, None], zero_point[:, None]
    q = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
    return (q - x).pow(2).mean(dim=1)


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int,
          symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    if symmetric:
        qmax = max(2 ** (bits - 1) - 1, 1)
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(1e-12)
        return scale, torch.zeros_like(scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero_point = minmax_scale_zero_point(lo, hi, bits)
    return scale, zero_point.round(), 0, 2**bits - 1


@torch.no_grad()
def weight_grid(weight: torch.Tensor, bits: int, method: str = "mse", per_channel: bool = True,
                symmetric: bool = False,
                ratios: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale, zero point and chosen clipping ratio of a ``bits``-bit weight grid.

    Per output channel (or one for the tensor), asymmetric unsigned ``[0, 2^bits - 1]`` unless
    ``symmetric``. ``method="minmax"`` covers the full range; ``"mse"`` picks the clipping ratio
    with the smallest squared error per channel.
    """
    check_method(method)
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel and w.dim() > 1 else w.reshape(1, -1)
    lo0, hi0 = flat.amin(dim=1), flat.amax(dim=1)
    best_ratio = torch.ones_like(lo0)
    if method == "mse":
        best_err = torch.full_like(lo0, math.inf)
        for ratio in (DEFAULT_RATIOS if ratios is None else ratios).tolist():
            scale, zp, qmin, qmax = _grid(lo0 * ratio, hi0 * ratio, bits, symmetric)
            err = _grid_error(flat, scale, zp, qmin, qmax)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    scale, zp, _, _ = _grid(lo0 * best_ratio, hi0 * best_ratio, bits, symmetric)
    return scale, zp, best_ratio


@torch.no_grad()
def act_range(samples: torch.Tensor, lo: float, hi: float, bits: int, method: str = "mse",
              ratios: torch.Tensor | None = None) -> tuple[float, float]:
    """Per-tensor clipping range ``(lo, hi)`` for activations whose extremes are ``lo``/``hi``.

    ``"mse"`` scales both ends by the ratio that minimises the quantization error on ``samples``
    (the grid is the activation quantizer's: unsigned ``bits`` bits over ``[min(lo,0), max(hi,0)]``),
    searched on a coarse grid of 5% steps and refined in 0.25% steps around the best one
    (or on ``ratios`` when given).
    """
    check_method(method)
    if method == "minmax" or samples.numel() == 0:
        return float(lo), float(hi)
    x = samples.detach().float().reshape(1, -1)
    lo_t = torch.tensor([float(lo)], device=x.device)
    hi_t = torch.tensor([float(hi)], device=x.device)

    def best_of(candidates: list[float]) -> float:
        errors = []
        for ratio in candidates:
            scale, zp, qmin, qmax = _grid(lo_t * ratio, hi_t * ratio, bits, symmetric=False)
            errors.append(_grid_error(x, scale, zp, qmin, qmax))
        return candidates[int(torch.cat(errors).argmin())]

    if ratios is not None:
        ratio = best_of(ratios.tolist())
    else:
        coarse = best_of([0.05 * i for i in range(1, 21)])
        ratio = best_of([r for r in (coarse + 0.0025 * i for i in range(-20, 21)) if 0.0 < r <= 1.0])
    return float(lo) * ratio, float(hi) * ratio


@dataclass
class ActStats:
    """Extremes and a uniform random sample of one layer's inputs over the calibration set."""

    lo: float
    hi: float
    sample: torch.Tensor


def _layer_inputs(module: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    if isinstance(module, QuantMultiheadAttention):
        found = list(args[:3]) + [kwargs[k] for k in ("query", "key", "value") if k in kwargs]
        unique = []
        for t in found:
            if isinstance(t, torch.Tensor) and all(t is not u for u in unique):
                unique.append(t)
        return [real_positions(t) for t in unique]
    return [real_positions(module.smooth_input(args[0]))] if args and isinstance(args[0], torch.Tensor) else []


@torch.no_grad()
def collect_activation_stats(model: nn.Module, calib: Inputs, layers: list[str], *, batch_size: int = 256,
                             device=None, max_samples: int = 2**16, seed: int = 0,
                             quiet: bool = True) -> dict[str, ActStats]:
    """Min, max and a random sample (at most ``max_samples`` values) of the inputs of ``layers``,
    observed in one float forward pass over ``calib`` (real tokens only: padding is left out)."""
    modules = quant_layers(model)
    n_batches = max(1, math.ceil(num_samples(calib) / batch_size))
    per_call = max(1, math.ceil(max_samples / n_batches))
    generator = torch.Generator().manual_seed(seed)
    lo = {n: math.inf for n in layers}
    hi = {n: -math.inf for n in layers}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name):
        def fn(module, args, kwargs):
            for x in _layer_inputs(module, args, kwargs):
                flat = x.detach().reshape(-1).float()
                lo[name] = min(lo[name], float(flat.min()))
                hi[name] = max(hi[name], float(flat.max()))
                idx = torch.randint(flat.numel(), (min(per_call, flat.numel()),), generator=generator)
                samples[name].append(flat[idx.to(flat.device)].cpu())
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n), with_kwargs=True) for n in layers]
    _float_pass(model, calib, batch_size, device, handles, "activation ranges", quiet, n_batches)
    stats = {}
    for n in layers:
        if not samples[n]:
            raise PTQError(f"layer {n} was never called on the calibration data: its input range cannot be measured")
        sample = torch.cat(samples[n])
        if sample.numel() > max_samples:
            sample = sample[torch.randperm(sample.numel(), generator=generator)[:max_samples]]
        stats[n] = ActStats(lo[n], hi[n], sample)
    return stats


def init_ranges(model: nn.Module, calib: Inputs, method: str = "mse", *, layers: list[str] | None = None,
                weights: bool = True, activations: bool = True, batch_size: int = 256, device=None,
                max_samples: int = 2**16, seed: int = 0, learnable: bool = True, quiet: bool = True) -> dict[str, dict]:
    """Calibrate weight and input ranges of a converted model at each layer's *current* precision.

    Set the precision first (``anybit.set_precision(model, 4)``); ranges are written with
    ``set_range(bits, ...)``, so other bit-widths keep their own. Weights: per output channel
    (asymmetric unless the layer's quantizer is symmetric). Activations: per tensor, from the
    float model's inputs to each layer. ``calib`` is a tensor of inputs (see
    :func:`anybit.ptq.calibration_tensor`). Returns what was set, per layer.
    """
    check_method(method)
    all_layers = quant_layers(model)
    if not all_layers:
        raise PTQError("this model has no quantizable layers: convert it first (anybit.convert or anybit.ptq.quantize)")
    names = list(all_layers) if layers is None else list(layers)
    result: dict[str, dict] = {}
    act_layers = [n for n in names if activations and all_layers[n].a_bits != FLOAT_BITS
                  and not getattr(all_layers[n].input_quant, "dynamic", False)]
    stats = collect_activation_stats(model, calib, act_layers, batch_size=batch_size, device=device,
                                     max_samples=max_samples, seed=seed, quiet=quiet) if act_layers else {}
    for name in names:
        layer = all_layers[name]
        entry: dict = {"w_bits": layer.w_bits, "a_bits": layer.a_bits, "weight_clip": None, "act_range": None}
        if weights and layer.w_bits != FLOAT_BITS and not isinstance(layer, QuantMultiheadAttention):
            wq = layer.weight_quant
            scale, zp, ratio = weight_grid(layer.smooth_weight(layer.weight), layer.w_bits, method,
                                           per_channel=wq.per_channel,
                                           symmetric=wq.method == "symmetric")
            wq.set_range(layer.w_bits, scale, zp, learnable)
            entry["weight_clip"] = float(ratio.mean())
        if name in stats:
            s = stats[name]
            lo, hi = act_range(s.sample, s.lo, s.hi, layer.a_bits, method)
            dev = next(layer.parameters()).device
            layer.input_quant.set_range(layer.a_bits, torch.tensor(lo, device=dev), torch.tensor(hi, device=dev),
                                        learnable)
            entry["act_range"] = [lo, hi]
        result[name] = entry
    return result


def has_ranges(layer: nn.Module) -> bool:
    """Whether a layer has calibrated ranges at its current precision (weights and inputs as needed)."""
    w_ok = (layer.w_bits == FLOAT_BITS or isinstance(layer, QuantMultiheadAttention)
            or layer.w_bits in layer.weight_quant.calibrated_bits())
    a_ok = (layer.a_bits == FLOAT_BITS or getattr(layer.input_quant, "dynamic", False)
            or layer.a_bits in layer.input_quant.calibrated_bits())
    return w_ok and a_ok


@torch.no_grad()
def smooth(model: nn.Module, calib: Inputs, alpha: float = 0.5, *, layers: list[str] | None = None,
           batch_size: int = 256, device=None, quiet: bool = True) -> dict[str, float]:
    """SmoothQuant-style outlier migration for the quantized Linear layers of a converted model.

    For input channel ``j`` of each layer, ``s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)`` (``X`` over the
    real tokens of one float pass over ``calib``); the layer then quantizes ``X / s`` and ``W * s``: the
    same product in float, with the activation outlier channels flattened and the weights taking on part of
    their range. Stored per layer (:meth:`~anybit.quant.ActQuantizer.set_smoothing`), saved in checkpoints,
    applied at every quantized precision; set it before the ranges are calibrated. Returns each layer's
    largest ``s_j / min s_j`` (how much the channels differed).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise PTQError(f"alpha={alpha!r} is invalid: expected a migration strength in [0, 1]")
    modules = quant_layers(model)
    names = [n for n in (layers if layers is not None else modules)
             if isinstance(modules[n], nn.Linear) and not modules[n].is_float]
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            x = real_positions(args[0].detach())
            m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
        return fn

    for n in names:
        modules[n].input_quant.set_smoothing(None)
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    _float_pass(model, calib, batch_size, device, handles, "smoothing", quiet)
    spread = {}
    for n in names:
        if n not in amax:
            continue
        layer = modules[n]
        w_max = layer.weight.detach().abs().amax(dim=0).float().clamp_min(1e-5)
        scales = (amax[n].clamp_min(1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)
        layer.input_quant.set_smoothing(scales.to(layer.weight.device))
        spread[n] = float(scales.max() / scales.min())
    return spread


def _float_pass(model: nn.Module, calib, batch_size: int, device, handles: list, desc: str, quiet: bool,
                total: int | None = None) -> None:
    """One pass over ``calib`` with the model in float and eval mode (its mode restored), the observing
    ``handles`` removed afterwards."""
    was_training = model.training
    try:
        model.eval()
        with precision(model, FLOAT_BITS):
            for x in progress(batches(calib, batch_size, device), desc=desc, quiet=quiet, total=total):
                run_model(model, x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
