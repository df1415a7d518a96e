"""Quantizer functions: straight-through rounding and uniform fake quantization.

Every function maps a float tensor to a float tensor that lies on a ``bits``-bit grid
("fake quantization"), so the result can be used by ordinary float kernels and trained
through the straight-through estimator (STE). ``bits=32`` returns the input unchanged.
"""

from __future__ import annotations

import torch

FLOAT_BITS = 32
VALID_BITS = tuple(range(1, 17)) + (FLOAT_BITS,)
ACT_GRANULARITIES = ("tensor", "token")
"""Activation ranges: one calibrated range per tensor, or one per token (row) computed at run time."""


class BitsError(ValueError):
    """A bit-width outside 1..16 or 32."""


def check_bits(bits: int | None, what: str = "bits") -> int:
    """Return ``bits`` as an int (``None`` means 32, float) or raise :class:`BitsError`."""
    if bits is None:
        return FLOAT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise BitsError(
            f"{what}={bits!r} is not a valid bit-width: expected an integer in 1..16, "
            f"or 32 for full precision"
        )
    return bits


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _channel_view(stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-output-channel statistic so it broadcasts against ``like``."""
    return stat.reshape((-1,) + (1,) * (like.dim() - 1))


def _reduce(w: torch.Tensor, per_channel: bool, fn) -> torch.Tensor:
    if per_channel and w.dim() > 1:
        return _channel_view(fn(w.reshape(w.shape[0], -1), dim=1), w)
    return fn(w.reshape(1, -1), dim=1).reshape(())


def _amax(t, dim):
    return t.abs().amax(dim=dim)


def _mean_abs(t, dim):
    return t.abs().mean(dim=dim)


def binary_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """1-bit weights: ``sign(w) * mean|w|`` (XNOR-Net style), with STE gradients.

    Zeros map to the positive level so that every weight takes one of two values.
    """
    scale = _reduce(w.detach(), per_channel, _mean_abs)
    sign = torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))
    # value + (w - w.detach()) is exactly the value (w + (value - w) is not, in float), gradient 1
    return (sign * scale).detach() + (w - w.detach())


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Affine fake quantization ``(clamp(round(x/scale) + zp, qmin, qmax) - zp) * scale``.

    Rounding uses the STE; gradients reach ``x`` inside the range and ``scale``/``zero_point``
    through the STE as in LSQ, so learnable ranges train with it.
    """
    q = clamp_ste(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def clamp_ste(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``clamp`` whose gradient is 1 on the closed range ``[lo, hi]`` (the STE clip mask).

    ``torch.clamp`` gives no gradient to values exactly at a bound, which would freeze the
    weights that set the range (the largest |w| of every channel) during training.
    """
    return torch.where(x < lo, lo, torch.where(x > hi, hi, x))


def symmetric_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Signed symmetric uniform quantization on ``2**(bits-1) - 1`` levels each side of zero."""
    if bits == FLOAT_BITS:
        return w
    if bits == 1:
        return binary_weight(w, per_channel)
    qmax = 2 ** (bits - 1) - 1
    scale = (_reduce(w.detach(), per_channel, _amax) / qmax).clamp_min(1e-12)
    zero = torch.zeros_like(scale)
    return fake_quant(w, scale, zero, -qmax, qmax)


def minmax_scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of an unsigned ``bits``-bit grid covering ``[lo, hi]``.

    The range is widened to include 0 so that zero is exactly representable.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero_point = clamp_ste(round_ste(-lo / scale), 0, levels)
    return scale, zero_point


def asymmetric_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Unsigned asymmetric uniform quantization between the (per-channel) min and max."""
    if bits == FLOAT_BITS:
        return w
    if bits == 1:
        return binary_weight(w, per_channel)
    lo = _reduce(w.detach(), per_channel, lambda t, dim: t.amin(dim=dim))
    hi = _reduce(w.detach(), per_channel, lambda t, dim: t.amax(dim=dim))
    scale, zero_point = minmax_scale_zero_point(lo, hi, bits)
    return fake_quant(w, scale, zero_point, 0, 2**bits - 1)


def dorefa_weight(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """DoReFa / Any-Precision weight quantizer.

    ``tanh`` squashes the weights, they are normalised to [0, 1], rounded to ``bits`` bits,
    mapped back to [-1, 1] and scaled by ``mean|w|`` (per tensor, or per output channel).
    """
    if bits == FLOAT_BITS:
        return w
    if bits == 1:
        return binary_weight(w, per_channel)
    t = torch.tanh(w)
    t = t / _reduce(t.detach(), per_channel, _amax).clamp_min(1e-12) * 0.5 + 0.5
    levels = 2**bits - 1
    q = round_ste(t * levels) / levels
    return (2 * q - 1) * _reduce(w.detach(), per_channel, _mean_abs)


WEIGHT_QUANTIZERS = {
    "dorefa": dorefa_weight,
    "symmetric": symmetric_weight,
    "asymmetric": asymmetric_weight,
}


def weight_bias_correction(
    w: torch.Tensor, w_q: torch.Tensor, detach: bool = True, eps: float = 1e-12
) -> torch.Tensor:
    """Give each output channel of ``w_q`` the mean and std of the float weight ``w``.

    ``Ŵ_c = (Q(W)_c - mean(Q(W)_c)) * std(W_c) / std(Q(W)_c) + mean(W_c)``. A channel whose
    quantized values are all equal has no spread to rescale and becomes ``mean(W_c)``.
    """
    return apply_wbc(w_q, *wbc_terms(w, w_q, detach, eps))


def wbc_terms(w: torch.Tensor, w_q: torch.Tensor, detach: bool = True,
              eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output channel ``(mean(Q(W)_c), std(W_c) / std(Q(W)_c), mean(W_c))``: the affine map weight
    bias correction applies to the channel's quantized values (:func:`apply_wbc`)."""
    flat_w = w.reshape(w.shape[0], -1)
    if detach:
        flat_w = flat_w.detach()
    return wbc_terms_from_stats(w_q, flat_w.mean(dim=1), flat_w.std(dim=1, unbiased=False), detach, eps)


def wbc_terms_from_stats(w_q: torch.Tensor, mean_w: torch.Tensor, std_w: torch.Tensor, detach: bool = True,
                         eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`wbc_terms` from the float weight's per-channel mean and std (all a packed export stores: the
    quantized weight's statistics follow from its codes)."""
    flat_q = w_q.reshape(w_q.shape[0], -1)
    stats_q = flat_q.detach() if detach else flat_q
    mean_q = stats_q.mean(dim=1)
    std_q = stats_q.std(dim=1, unbiased=False)
    gain = torch.where(std_q > eps, std_w / std_q.clamp_min(eps), torch.zeros_like(std_q))
    return mean_q, gain, mean_w


def apply_wbc(w_q: torch.Tensor, mean_q: torch.Tensor, gain: torch.Tensor, mean_w: torch.Tensor) -> torch.Tensor:
    """``(Q(W)_c - mean_q_c) * gain_c + mean_w_c`` per output channel (exported models apply it the same way)."""
    flat_q = w_q.reshape(w_q.shape[0], -1)
    out = (flat_q - mean_q[:, None]) * gain[:, None] + mean_w[:, None]
    return out.reshape(w_q.shape)


# PyTorch's fused per-tensor fake-quantize kernels are slow on CPU (measured 15-35x the time of three
# vectorised passes over the activation), and so is clamp's backward. On CPU, grids that receive no
# gradient go through these two functions instead: the forward is a few in-place passes, and the
# straight-through backward is one ``hardtanh_backward`` pass. The results equal PyTorch's kernels.
class _FixedGridFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = _grid_span(scale, zero_point, qmin, qmax)
        return _to_grid(x, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _pass_between(grad, x, *ctx.bounds), None, None, None, None


class _ClampSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)   # like torch.clamp with number bounds: no gradient at the bounds themselves
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _pass_between(grad, x, *ctx.bounds), None, None


def _to_grid(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale + zero_point), qmin, qmax) - zero_point) * scale``, as PyTorch computes it."""
    if zero_point == 0:   # the usual [0, hi] activation range: two passes fewer
        return (x * (1.0 / scale)).round_().clamp_(qmin, qmax).mul_(scale)
    return (x * (1.0 / scale)).add_(zero_point).round_().clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


def _grid_span(scale: float, zero_point: int, qmin: int, qmax: int) -> tuple[float, float]:
    """The inputs that round into ``[qmin, qmax]``: where the straight-through gradient passes."""
    return (qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale


def _pass_between(grad: torch.Tensor, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``grad`` where ``lo < x < hi``, else 0 (one fused pass)."""
    return torch.ops.aten.hardtanh_backward(grad, x, lo, hi)


def integer_range(bits: int, signed: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of an activation grid: unsigned ``[0, 2^b - 1]``, or signed symmetric
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero in the middle, one code unused, as for symmetric weights)."""
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def fake_quant_fixed_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                          signed: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization to the ``bits``-bit grid ``(scale, zero_point)`` (unsigned, or signed
    symmetric: :func:`integer_range`), with the straight-through gradient for ``x`` only (the grid is treated
    as a constant)."""
    qmin, qmax = integer_range(bits, signed)
    if x.device.type == "cpu":
        return _FixedGridFakeQuant.apply(x, float(scale), int(zero_point), qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, scale.detach().reshape(1).float(),
                                                 zero_point.detach().reshape(1).int(), qmin, qmax)


def clamp_fixed(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``x`` clamped to a constant ``[lo, hi]`` (gradient 1 inside, 0 outside)."""
    if x.device.type == "cpu":
        return _ClampSTE.apply(x, float(lo), float(hi))
    return torch.clamp(x, lo.detach(), hi.detach())


class _LearnedGridFakeQuant(torch.autograd.Function):
    """The CPU counterpart of ``torch._fake_quantize_learnable_per_tensor_affine`` (same forward and
    gradients: STE for ``x``, LSQ-style gradients for the scale and the zero point)."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin: int, qmax: int, grad_factor: float):
        s = float(scale)
        zp = min(max(round(float(zero_point)), qmin), qmax)
        out = _to_grid(x, s, zp, qmin, qmax)
        ctx.save_for_backward(x, out)   # both are kept alive anyway (by the layers around)
        ctx.grid = (s, *_grid_span(s, zp, qmin, qmax), grad_factor)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        s, lo, hi, grad_factor = ctx.grid
        grad_x = _pass_between(grad, x, lo, hi)
        g, gx = grad.reshape(-1), grad_x.reshape(-1)
        # d(out)/d(scale) = (out - x)/s inside the grid and out/s where clipped (= qmin - zp or qmax - zp)
        grad_scale = (torch.dot(g, out.reshape(-1)) - torch.dot(gx, x.reshape(-1))) * (grad_factor / s)
        # d(out)/d(zero_point) = 0 inside the grid and -s where clipped
        grad_zero_point = (gx.sum() - g.sum()) * (s * grad_factor)
        return (grad_x, grad_scale.reshape(1).to(x.dtype), grad_zero_point.reshape(1).to(x.dtype),
                None, None, None)


def fake_quant_learned_grid(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                            grad_factor: float, signed: bool = False) -> torch.Tensor:
    """Per-tensor fake quantization with gradients for ``scale`` and ``zero_point`` (LSQ-style, scaled
    by ``grad_factor``), as ``torch._fake_quantize_learnable_per_tensor_affine``; ``signed``: the symmetric
    grid of :func:`integer_range`."""
    qmin, qmax = integer_range(bits, signed)
    scale, zero_point = scale.reshape(1).to(x.dtype), zero_point.reshape(1).to(x.dtype)
    if x.device.type == "cpu":
        return _LearnedGridFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor)
    return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, qmin, qmax, grad_factor)


def fake_quant_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token fake quantization: every row (the last dimension: one token's features, or one
    sample's) gets its own unsigned ``bits``-bit grid over ``[min(row, 0), max(row, 0)]``, computed from
    the input itself. Nothing is clipped, so the straight-through gradient reaches every element. This is
    what an integer kernel with per-row activation scales (applied after the integer matmul) computes."""
    flat = x.detach()
    lo = flat.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = flat.amax(dim=-1, keepdim=True).clamp(min=0)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero_point = torch.round(-lo / scale)
    q = torch.clamp(torch.round(flat / scale) + zero_point, 0, levels)
    return x + ((q - zero_point) * scale - flat)
