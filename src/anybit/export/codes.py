"""The integer codes behind a layer's fake-quantized weight, and the exact way back.

At ``b`` bits every weight quantizer of :mod:`anybit.quant` puts each weight on one of ``2**b`` levels:

=========== ======================================= =========================================
kind        codes ``q``                             dequantized (the same float operations)
=========== ======================================= =========================================
``affine``  ``clamp(round(w / s) + z, qmin, qmax)`` ``(q - z) * s`` (symmetric, asymmetric and
                                                    calibrated per-bit grids)
``dorefa``  ``round(t * L)``, ``t`` in [0, 1]       ``(2 * (q / L) - 1) * mean|w|``
``binary``  ``w >= 0``                              ``±1 * mean|w|`` (1 bit, every method)
=========== ======================================= =========================================

With weight bias correction on, each output channel is then mapped by
``(deq - mean_q) * gain + mean_w`` (:func:`anybit.quant.apply_wbc`), so the whole weight is an affine
function of its codes per output channel. :func:`weight_codes` extracts codes and terms and checks that
:meth:`WeightCodes.dequantize` reproduces the layer's own fake-quantized weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quant import FLOAT_BITS, QuantMultiheadAttention, apply_wbc, weight_bias_correction
from ..quant.functional import wbc_terms_from_stats
from ..quant.functional import _amax, _mean_abs, _reduce, minmax_scale_zero_point
from ..quant.quantizers import _shape_like
from .errors import ExportError

KINDS = ("affine", "dorefa", "binary")


@dataclass
class WeightCodes:
    """One weight at one bit-width: integer codes, the grid's terms and (if on) weight bias correction."""

    bits: int
    kind: str
    codes: torch.Tensor                     # int64, the weight's shape, in [qmin, qmax]
    qmin: int
    qmax: int
    params: dict[str, torch.Tensor]         # affine: scale, zero_point; dorefa and binary: scale
    wbc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # (mean_q, gain, mean_w) per channel
    wbc_stats: tuple[torch.Tensor, torch.Tensor] | None = None   # (mean_w, std_w): what the terms follow from

    def with_wbc_stats(self, mean_w: torch.Tensor, std_w: torch.Tensor) -> "WeightCodes":
        """Weight bias correction's terms from the float weight's per-channel mean and std and the codes
        (the quantized weight's own mean and std), by the same operations as the layer."""
        self.wbc_stats = (mean_w, std_w)
        self.wbc = wbc_terms_from_stats(self.base(), mean_w, std_w)
        return self

    def base(self) -> torch.Tensor:
        """The quantizer's output (before weight bias correction), by its own float operations."""
        q = self.codes.to(torch.float32)
        if self.kind == "affine":
            return (q - self.params["zero_point"]) * self.params["scale"]
        if self.kind == "dorefa":
            return (2 * (q / (2**self.bits - 1)) - 1) * self.params["scale"]
        sign = torch.where(q > 0, torch.ones_like(q), -torch.ones_like(q))
        return sign * self.params["scale"]

    def dequantize(self) -> torch.Tensor:
        """The weight as the layer uses it at ``bits``."""
        w_q = self.base()
        return apply_wbc(w_q, *self.wbc) if self.wbc is not None else w_q

    def channel_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` per output channel (float64) with ``weight = A * q + B`` in exact arithmetic."""
        channels = self.codes.shape[0]

        def per_channel(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to(torch.float64).reshape(-1)
            return t.expand(channels).clone() if t.numel() == 1 else t.reshape(channels)

        scale = per_channel(self.params["scale"])
        if self.kind == "affine":
            a, b = scale, -per_channel(self.params["zero_point"]) * scale
        elif self.kind == "dorefa":
            a, b = 2 * scale / (2**self.bits - 1), -scale
        else:
            a, b = 2 * scale, -scale
        if self.wbc is not None:
            mean_q, gain, mean_w = (t.detach().to(torch.float64) for t in self.wbc)
            a, b = a * gain, (b - mean_q) * gain + mean_w
        return a, b


def quantized_weight_names(layer: nn.Module) -> list[str]:
    """The parameters a quantizable layer quantizes (``weight``; the projections of attention)."""
    if isinstance(layer, QuantMultiheadAttention):
        names = []
        for name in layer._WEIGHT_NAMES:
            module_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(module_name) if module_name else layer
            if owner._parameters.get(attr) is not None:
                names.append(name)
        return names
    return ["weight"]


def _base_codes(quantizer, w: torch.Tensor, bits: int) -> WeightCodes:
    """Codes along the path :class:`~anybit.quant.WeightQuantizer` takes at ``bits``."""
    scale = quantizer._get(bits, "scale")
    if scale is not None:   # a grid calibrated for this bit-width (post-training quantization)
        zero_point = quantizer._get(bits, "zero_point").detach()
        zero_point = zero_point + (torch.round(zero_point) - zero_point)
        s = scale.detach().reshape(_shape_like(scale, w))
        z = zero_point.reshape(_shape_like(zero_point, w))
        qmin, qmax = quantizer.grid(bits)
        q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
        return WeightCodes(bits, "affine", q.to(torch.int64), qmin, qmax, {"scale": s, "zero_point": z})
    per_channel = quantizer.per_channel
    if bits == 1:
        return WeightCodes(1, "binary", (w >= 0).to(torch.int64), 0, 1,
                           {"scale": _reduce(w, per_channel, _mean_abs)})
    if quantizer.method == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        s = (_reduce(w, per_channel, _amax) / qmax).clamp_min(1e-12)
        z = torch.zeros_like(s)
        q = torch.clamp(torch.round(w / s) + z, -qmax, qmax)
        return WeightCodes(bits, "affine", q.to(torch.int64), -qmax, qmax, {"scale": s, "zero_point": z})
    if quantizer.method == "asymmetric":
        lo = _reduce(w, per_channel, lambda t, dim: t.amin(dim=dim))
        hi = _reduce(w, per_channel, lambda t, dim: t.amax(dim=dim))
        s, z = minmax_scale_zero_point(lo, hi, bits)
        levels = 2**bits - 1
        q = torch.clamp(torch.round(w / s) + z, 0, levels)
        return WeightCodes(bits, "affine", q.to(torch.int64), 0, levels, {"scale": s, "zero_point": z})
    if quantizer.method == "dorefa":
        t = torch.tanh(w)
        t = t / _reduce(t, per_channel, _amax).clamp_min(1e-12) * 0.5 + 0.5
        levels = 2**bits - 1
        q = torch.round(t * levels)
        return WeightCodes(bits, "dorefa", q.to(torch.int64), 0, levels, {"scale": _reduce(w, per_channel, _mean_abs)})
    raise ExportError(f"weight quantizer {quantizer.method!r} has no integer export")


@torch.no_grad()
def weight_codes(layer: nn.Module, name: str, bits: int, where: str = "layer") -> WeightCodes:
    """The codes of ``layer``'s parameter ``name`` at ``bits`` (1..16), checked to dequantize to exactly
    the weight the layer computes at that bit-width."""
    if bits == FLOAT_BITS:
        raise ValueError("32-bit weights are stored as floats, not codes")
    w = layer.get_parameter(name).detach()
    codes = _base_codes(layer.weight_quant, w, bits)
    expected = layer.weight_quant(w, bits)
    if layer.wbc:
        flat = w.reshape(w.shape[0], -1)
        codes.with_wbc_stats(flat.mean(dim=1), flat.std(dim=1, unbiased=False))
        expected = weight_bias_correction(w, expected, detach=True)
    got = codes.dequantize()
    if not torch.equal(got, expected):
        worst = (got - expected).abs().max().item()
        raise ExportError(f"{where}: the {bits}-bit codes of {name!r} do not reproduce the layer's weight exactly "
                          f"(largest difference {worst:.3g}); this quantizer cannot be exported")
    return codes
