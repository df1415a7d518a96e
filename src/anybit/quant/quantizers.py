"""Quantizer modules: hold the ranges a quantizer learns or is calibrated to.

A :class:`WeightQuantizer` derives its grid from the weight itself at every call (so one
float weight serves every bit-width) unless a range was calibrated for that bit-width.
An :class:`ActQuantizer` keeps one activation range shared by every bit-width, learnt
(LSQ/PACT-style) or fixed, plus optional per-bit-width ranges set by calibration.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .functional import (
    ACT_GRANULARITIES,
    FLOAT_BITS,
    WEIGHT_QUANTIZERS,
    clamp_fixed,
    fake_quant,
    fake_quant_fixed_grid,
    fake_quant_learned_grid,
    integer_range,
    fake_quant_per_token,
    minmax_scale_zero_point,
)


class RangeNotCalibratedError(RuntimeError, ValueError):
    """An activation range was needed before it was learnt or calibrated (a ``ValueError`` too, like
    anybit's other errors a user can fix: the command line prints it without a traceback)."""


_BITS_KEY = re.compile(r"^b(\d+)_")


class _PerBitRanges(nn.Module):
    """Per-bit-width calibrated tensors, created on demand and restored from state dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.ranges = nn.ParameterDict()

    def calibrated_bits(self) -> list[int]:
        return sorted({int(m.group(1)) for k in self.ranges.keys() if (m := _BITS_KEY.match(k))})

    def clear_ranges(self, bits: int | None = None) -> None:
        for key in list(self.ranges.keys()):
            if bits is None or key.startswith(f"b{bits}_"):
                del self.ranges[key]

    def _set(self, bits: int, name: str, value: torch.Tensor, learnable: bool) -> None:
        self.ranges[f"b{bits}_{name}"] = nn.Parameter(
            value.detach().clone().float(), requires_grad=learnable
        )

    def _get(self, bits: int, name: str) -> torch.Tensor | None:
        key = f"b{bits}_{name}"
        return self.ranges[key] if key in self.ranges else None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        ranges_prefix = prefix + "ranges."
        for key, value in state_dict.items():
            if key.startswith(ranges_prefix):
                name = key[len(ranges_prefix):]
                if "." not in name and name not in self.ranges:
                    self.ranges[name] = nn.Parameter(torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)


class WeightQuantizer(_PerBitRanges):
    """Weight fake-quantizer: ``dorefa``, ``symmetric`` or ``asymmetric``."""

    def __init__(self, method: str = "dorefa", per_channel: bool = False) -> None:
        super().__init__()
        if method not in WEIGHT_QUANTIZERS:
            raise ValueError(
                f"weight quantizer {method!r} is unknown: expected one of {sorted(WEIGHT_QUANTIZERS)}"
            )
        self.method = method
        self.per_channel = per_channel

    def set_range(
        self, bits: int, scale: torch.Tensor, zero_point: torch.Tensor, learnable: bool = True
    ) -> None:
        """Fix the grid used at ``bits``: per-channel (or scalar) scale and integer zero point."""
        self._set(bits, "scale", scale, learnable)
        self._set(bits, "zero_point", zero_point, learnable)

    def grid(self, bits: int) -> tuple[int, int]:
        """Integer range ``(qmin, qmax)`` of a calibrated grid at ``bits``."""
        if self.method == "symmetric":
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return 0, 2**bits - 1

    def forward(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FLOAT_BITS:
            return w
        scale = self._get(bits, "scale")
        if scale is not None:
            zero_point = self._get(bits, "zero_point")
            qmin, qmax = self.grid(bits)
            zp = zero_point + (torch.round(zero_point) - zero_point).detach()
            return fake_quant(w, scale.reshape(_shape_like(scale, w)),
                              zp.reshape(_shape_like(zp, w)), qmin, qmax)
        return WEIGHT_QUANTIZERS[self.method](w, bits, self.per_channel)

    def extra_repr(self) -> str:
        return f"method={self.method}, per_channel={self.per_channel}"


def _shape_like(stat: torch.Tensor, w: torch.Tensor) -> tuple[int, ...]:
    if stat.dim() == 0 or stat.numel() == 1:
        return ()
    return (-1,) + (1,) * (w.dim() - 1)


class ActQuantizer(_PerBitRanges):
    """Activation fake-quantizer with one clipping range ``[lo, hi]`` shared by all bit-widths.

    ``mode="learned"``: the range starts at the min/max of the first quantized training batch and
    is learnt with LSQ-style gradients. ``mode="fixed"``: the range stays at ``init_range``
    (Any-Precision uses ``(0, 1)``). Ranges set by :meth:`set_range` for one bit-width take
    precedence at that bit-width (on the unsigned min/max grid).

    ``signed=False``: an unsigned ``2^b``-level grid over ``[lo, hi]`` widened to include 0 (for ReLU
    outputs). ``signed=True``: a symmetric grid over ``[-r, r]``, ``r = max(|lo|, |hi|)`` (only ``hi`` is
    kept and learnt; ``lo = -hi``): ``2^(b-1) - 1`` levels each side of an exact zero — for signed inputs such
    as LayerNorm outputs, which an unsigned grid over ``[0, r]`` would clip to one sign. At 1 bit it is the
    threshold code ``{0, r}`` (see :meth:`_signed`).
    """

    def __init__(self, mode: str = "learned", init_range: tuple[float, float] = (0.0, 1.0),
                 clip_float: bool = False, signed: bool = False, granularity: str = "tensor") -> None:
        super().__init__()
        self.clip_float = clip_float  # clip (without rounding) at 32 bits too: QuantSpec.act_clip_float
        if mode not in ("learned", "fixed"):
            raise ValueError(f"activation quantizer mode {mode!r} is unknown: expected 'learned' or 'fixed'")
        if granularity not in ACT_GRANULARITIES:
            raise ValueError(f"activation granularity {granularity!r} is unknown: expected one of "
                             f"{list(ACT_GRANULARITIES)}")
        self.mode = mode
        self.signed = bool(signed)
        self.granularity = granularity
        lo, hi = float(init_range[0]), float(init_range[1])
        if not hi > lo:
            raise ValueError(f"activation range {init_range!r} is empty: expected (lo, hi) with hi > lo")
        if self.signed:
            hi = max(abs(lo), abs(hi))
            lo = -hi
        learn = mode == "learned"
        self.lo = nn.Parameter(torch.tensor(lo), requires_grad=learn and not self.signed)
        self.hi = nn.Parameter(torch.tensor(hi), requires_grad=learn)
        self.register_buffer("initialized", torch.tensor(mode == "fixed" or granularity == "token"))

    def smoothing(self) -> torch.Tensor | None:
        """Per-input-channel smoothing scales ``s`` (SmoothQuant), if calibrated: the layer quantizes ``x / s``
        and ``W * s`` instead of ``x`` and ``W`` -- the same product, with the activation outliers moved
        into the weights. Set by :meth:`set_smoothing`; used at every quantized precision."""
        return self.ranges["smooth"] if "smooth" in self.ranges else None

    def set_smoothing(self, scales: torch.Tensor | None) -> None:
        if scales is None:
            if "smooth" in self.ranges:
                del self.ranges["smooth"]
            return
        self.ranges["smooth"] = nn.Parameter(scales.detach().clone().float(), requires_grad=False)

    @property
    def dynamic(self) -> bool:
        """Per-token ranges computed from each input at run time: nothing to calibrate."""
        return self.granularity == "token"

    @torch.no_grad()
    def init_range(self, lo: float | torch.Tensor, hi: float | torch.Tensor) -> None:
        """Set the shared range (and mark it initialised); a signed quantizer takes ``±max(|lo|, |hi|)``."""
        lo, hi = float(lo), float(hi)
        if self.signed:
            hi = max(abs(lo), abs(hi), 1e-8)
            lo = -hi
        self.lo.fill_(lo)
        self.hi.fill_(max(hi, lo + 1e-8))
        self.initialized.fill_(True)

    def set_range(self, bits: int, lo: torch.Tensor, hi: torch.Tensor, learnable: bool = True) -> None:
        """Calibrated range used at ``bits`` only."""
        self._set(bits, "lo", torch.as_tensor(lo), learnable)
        self._set(bits, "hi", torch.as_tensor(hi), learnable)

    def range_for(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self._get(bits, "lo")
        if lo is not None:
            return lo, self._get(bits, "hi")
        return self.lo, self.hi

    def _shared_lo(self) -> torch.Tensor:
        return -self.hi if self.signed else self.lo

    def forward(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        if bits == FLOAT_BITS:
            if self.clip_float and (self.mode == "fixed" or bool(self.initialized)):
                if self.hi.requires_grad and torch.is_grad_enabled():
                    return torch.clamp(x, self._shared_lo(), self.hi)
                return clamp_fixed(x, self._shared_lo(), self.hi)
            return x
        if self.granularity == "token":
            return fake_quant_per_token(x, bits)
        lo, hi = self.range_for(bits)
        if lo is self.lo and not bool(self.initialized):
            if not self.training:
                raise RangeNotCalibratedError(
                    "activation range is not calibrated: train the model at a quantized bit-width, "
                    "or calibrate it first (anybit.calibrate_activations(model, data))"
                )
            self.init_range(x.detach().amin(), x.detach().amax())
        learning = torch.is_grad_enabled() and (lo.requires_grad or hi.requires_grad)
        if lo is self.lo and self.signed:
            return self._signed(x, bits, learning)
        scale, zero_point = minmax_scale_zero_point(lo, hi, bits)
        if not learning:
            return fake_quant_fixed_grid(x, scale, zero_point, bits)
        grad_factor = 1.0 / (x.numel() * (2**bits - 1)) ** 0.5
        return fake_quant_learned_grid(x, scale, zero_point, bits, grad_factor)

    def _signed(self, x: torch.Tensor, bits: int, learning: bool) -> torch.Tensor:
        """The symmetric grid over ``[-r, r]``; at 1 bit, which has no grid with 0 and both signs, the threshold
        code ``{0, r}`` (the unsigned grid over ``[0, r]``): it keeps the sparsity of the 2-bit grid ``{-r, 0, r}``
        (most inputs round to 0 at both); a sign code ``±r/2`` would have no zero at all (benchmarks/vit.py's
        ``emqnet-sign-1bit`` run compares the two)."""
        r = self.hi.clamp_min(1e-8)
        signed = bits > 1
        qmax = integer_range(bits, signed)[1]
        scale, zero = r / qmax, torch.zeros((), device=x.device)
        if not learning:
            return fake_quant_fixed_grid(x, scale, zero, bits, signed=signed)
        grad_factor = 1.0 / (x.numel() * qmax) ** 0.5
        return fake_quant_learned_grid(x, scale, zero, bits, grad_factor, signed=signed)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}" + (", signed" if self.signed else "")
                + (", granularity=token" if self.granularity == "token" else ""))
