"""Quantizable layers: drop-in subclasses of ``nn.Conv2d``, ``nn.Linear`` and
``nn.MultiheadAttention`` that quantize weight and input at their current precision.

The full-precision weight is kept; at ``w_bits == a_bits == 32`` a layer runs the parent
class's own forward, so its output is bit-identical to the float layer's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .functional import FLOAT_BITS, check_bits, weight_bias_correction
from .quantizers import ActQuantizer, WeightQuantizer


class FrozenPrecisionError(ValueError):
    """A layer of a packed export asked to run at a weight precision it was not exported at."""


class QuantModule:
    """Precision state and weight/input quantizers shared by every quantizable layer.

    ``w_bits``/``a_bits`` are the current precision; ``pinned`` is a ``(w, a)`` pair that uniform
    precision changes leave alone (used for first and last layers).
    """

    w_bits: int
    a_bits: int
    pinned: tuple[int, int] | None
    wbc: bool
    wbc_detach: bool
    precision_trace = None   # a PrecisionTrace shared with per-precision BatchNorms (set by convert)
    frozen_bits: int | None = None   # the weights hold their quantized values at this bit-width (packed exports)

    def _init_quant(
        self,
        weight_quant: WeightQuantizer,
        input_quant: ActQuantizer,
        wbc: bool = False,
        wbc_detach: bool = True,
    ) -> None:
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.wbc = wbc
        self.wbc_detach = wbc_detach
        self.w_bits = FLOAT_BITS
        self.a_bits = FLOAT_BITS
        self.pinned = None

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS

    @property
    def runs_float_forward(self) -> bool:
        """At full precision and without input clipping (``QuantSpec.act_clip_float`` spares pinned layers)."""
        return self.is_float and (self.pinned is not None or not getattr(self.input_quant, "clip_float", False))

    def record_precision(self) -> None:
        """Tell the model's per-precision BatchNorms at which precision the next one's input is computed."""
        if self.precision_trace is not None:
            self.precision_trace.last = (self.w_bits, self.a_bits)

    def set_bits(self, w_bits: int, a_bits: int) -> None:
        self.w_bits = check_bits(w_bits, "w_bits")
        self.a_bits = check_bits(a_bits, "a_bits")

    def smooth_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s`` with the layer's smoothing scales (SmoothQuant; per input channel), else ``x``."""
        s = self.input_quant.smoothing() if isinstance(self, nn.Linear) else None
        return x if s is None else x / s

    def smooth_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W * s`` (scales on the input dimension) with the layer's smoothing scales, else ``W``."""
        s = self.input_quant.smoothing() if isinstance(self, nn.Linear) else None
        return weight if s is None else weight * s

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as used at the current precision (weight bias correction applied if on)."""
        if self.frozen_bits is not None:
            if self.w_bits != self.frozen_bits:
                raise FrozenPrecisionError(
                    f"this layer was loaded from a packed export whose weights are quantized at {self.frozen_bits} "
                    f"bits; it cannot run at {self.w_bits}-bit weights. Load the source checkpoint or an "
                    f"every-precision package (anybit export --bits 1-8) for other precisions")
            return weight
        w_q = self.weight_quant(weight, self.w_bits)
        if self.wbc and self.w_bits != FLOAT_BITS:
            w_q = weight_bias_correction(weight, w_q, detach=self.wbc_detach)
        return w_q

    def quant_extra_repr(self) -> str:
        pin = f", pinned={self.pinned}" if self.pinned else ""
        return f"w_bits={self.w_bits}, a_bits={self.a_bits}, wbc={self.wbc}{pin}"


def _copy_float_params(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` use ``src``'s own parameter and buffer objects (optimizers keep working)."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        setattr(dst, name, b)
    dst.train(src.training)


class QuantConv2d(nn.Conv2d, QuantModule):
    """``nn.Conv2d`` whose weight and input are quantized at ``w_bits``/``a_bits``."""

    def __init__(self, *args, weight_quant=None, input_quant=None, wbc=False, wbc_detach=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant or WeightQuantizer(), input_quant or ActQuantizer(), wbc, wbc_detach)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **quant_kwargs) -> "QuantConv2d":
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device="meta", **quant_kwargs,
        )
        _copy_float_params(q, conv)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.record_precision()
        if self.runs_float_forward:
            return super().forward(x)
        return self._conv_forward(self.input_quant(x, self.a_bits), self.quantize_weight(self.weight), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quant_extra_repr()


class QuantLinear(nn.Linear, QuantModule):
    """``nn.Linear`` whose weight and input are quantized at ``w_bits``/``a_bits``."""

    def __init__(self, *args, weight_quant=None, input_quant=None, wbc=False, wbc_detach=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant or WeightQuantizer(), input_quant or ActQuantizer(), wbc, wbc_detach)

    @classmethod
    def from_float(cls, linear: nn.Linear, **quant_kwargs) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device="meta", **quant_kwargs)
        _copy_float_params(q, linear)
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.record_precision()
        if self.runs_float_forward:
            return super().forward(x)
        return F.linear(self.input_quant(self.smooth_input(x), self.a_bits),
                        self.quantize_weight(self.smooth_weight(self.weight)), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.quant_extra_repr()


class QuantMultiheadAttention(nn.MultiheadAttention, QuantModule):
    """``nn.MultiheadAttention`` with quantized projection weights and quantized inputs.

    Quantized: the packed input projection (``in_proj_weight``, or the separate q/k/v weights),
    the output projection weight, and the query/key/value inputs. Left in float: the attention
    scores, the softmax and the attention output that feeds the output projection, because
    PyTorch computes them inside one fused function.
    """

    _WEIGHT_NAMES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight")

    def __init__(self, *args, weight_quant=None, input_quant=None, wbc=False, wbc_detach=True, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_quant or WeightQuantizer(), input_quant or ActQuantizer(), wbc, wbc_detach)
        self._reparametrized = False

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, **quant_kwargs) -> "QuantMultiheadAttention":
        q = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device="meta", **quant_kwargs,
        )
        _copy_float_params(q, mha)
        _copy_float_params(q.out_proj, mha.out_proj)
        return q.to(mha.out_proj.weight.device)

    def quantized_parameters(self) -> dict[str, torch.Tensor]:
        params = {}
        for name in self._WEIGHT_NAMES:
            w = self.get_parameter(name) if _has_param(self, name) else None
            if w is not None:
                params[name] = self.quantize_weight(w)
        return params

    def forward(self, query, key, value, *args, **kwargs):
        self.record_precision()
        if self.is_float or self._reparametrized:
            return super().forward(query, key, value, *args, **kwargs)
        q_query = self.input_quant(query, self.a_bits)
        q_key = q_query if key is query else self.input_quant(key, self.a_bits)
        q_value = q_key if value is key else self.input_quant(value, self.a_bits)
        self._reparametrized = True
        try:
            return functional_call(self, self.quantized_parameters(), (q_query, q_key, q_value, *args),
                                   kwargs, strict=False)
        finally:
            self._reparametrized = False

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + self.quant_extra_repr()


def _has_param(module: nn.Module, name: str) -> bool:
    try:
        return module.get_parameter(name) is not None
    except AttributeError:
        return False


ACTIVATION_ROLES = ("matmul", "probabilities", "softmax_input")
SOFTMAX_INPUT_RANGE = (-8.0, 0.0)
"""The fixed grid of a quantized softmax input, after its row maximum is subtracted: probabilities below
``e^-8`` of the largest one are rounded up to it (softmax is unchanged by the shift)."""


class ActivationPoint(nn.Identity):
    """Marks an activation inside a model that :func:`anybit.convert` may quantize (an identity in float).

    ``role`` says what it is and which :class:`~anybit.QuantSpec` field turns it on: ``"matmul"`` (an input
    of a matmul between two activations, such as q, k or v in attention: ``attn_matmul``, with the spec's
    activation quantizer), ``"probabilities"`` (attention probabilities: ``attn_matmul``, on a fixed [0, 1]
    grid) and ``"softmax_input"`` (``attn_softmax``, the scores relative to their row maximum on the fixed
    grid :data:`SOFTMAX_INPUT_RANGE`).
    """

    def __init__(self, role: str = "matmul") -> None:
        super().__init__()
        if role not in ACTIVATION_ROLES:
            raise ValueError(f"activation role {role!r} is unknown: expected one of {', '.join(ACTIVATION_ROLES)}")
        self.role = role

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


class QuantAct(nn.Module):
    """A quantized :class:`ActivationPoint`: fake-quantizes its input at the activation bit-width of the
    quantizable layer that ran just before it (the projection that computed q, k and v, for attention).

    It has no precision of its own, so :func:`anybit.set_precision` (uniform or a per-layer map) sets it
    through that layer; at 32 bits it is the identity. Not a weight layer: it is not in
    :func:`anybit.quant_layers` and bit allocation does not count it.
    """

    precision_trace = None   # the model's PrecisionTrace (set by convert)

    def __init__(self, role: str, input_quant: ActQuantizer) -> None:
        super().__init__()
        if role not in ACTIVATION_ROLES:
            raise ValueError(f"activation role {role!r} is unknown: expected one of {', '.join(ACTIVATION_ROLES)}")
        self.role = role
        self.input_quant = input_quant

    @property
    def a_bits(self) -> int:
        """The activation bit-width it quantizes at now (32 before any quantizable layer has run)."""
        last = self.precision_trace.last if self.precision_trace is not None else None
        return FLOAT_BITS if last is None else last[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.a_bits
        if bits == FLOAT_BITS:
            return x
        if self.role == "softmax_input":
            x = x - x.detach().amax(dim=-1, keepdim=True)
        return self.input_quant(x, bits)

    def extra_repr(self) -> str:
        return f"role={self.role!r}"


class PrecisionNotTrainedError(ValueError):
    """A switchable BatchNorm asked for a precision it has no statistics for."""


class SwitchableBatchNorm(nn.Module):
    """One BatchNorm per precision (the Any-Precision baseline); the active one is chosen by
    :func:`anybit.set_precision`. Keys are precision keys such as ``"4"`` or ``"w4a8"``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, keys: list[str]) -> None:
        super().__init__()
        if not keys:
            raise ValueError("switchable BatchNorm needs at least one bit-width")
        self.bns = nn.ModuleDict({key: _copy_bn(bn) for key in keys})
        self.active = precision_key(FLOAT_BITS, FLOAT_BITS)
        self.train(bn.training)

    def add(self, key: str, source: str) -> None:
        """Add a BatchNorm for ``key`` initialised as a copy of the one for ``source``."""
        self.bns[key] = _copy_bn(self.bns[source])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active not in self.bns:
            raise PrecisionNotTrainedError(
                f"this switchable BatchNorm has no statistics for precision {self.active!r} "
                f"(it has {sorted(self.bns.keys(), key=_key_order)}); re-estimate them first "
                f"(anybit eval --recalibrate-bn, or anybit.train.recalibrate_bn)"
            )
        return self.bns[self.active](x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # Checkpoints may hold BNs for precisions added after conversion (BN re-calibration).
        bns_prefix = prefix + "bns."
        for key in state_dict:
            if key.startswith(bns_prefix):
                name = key[len(bns_prefix):].split(".")[0]
                if name not in self.bns:
                    self.add(name, next(iter(self.bns.keys())))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


def _copy_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    copy = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                    track_running_stats=bn.track_running_stats, device=_device_of(bn))
    copy.load_state_dict(bn.state_dict())
    copy.train(bn.training)
    return copy


def _device_of(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def _key_order(key: str):
    return (0, int(key)) if key.isdigit() else (1, key)


def precision_key(w_bits: int, a_bits: int) -> str:
    """Key of a (w, a) precision in switchable BatchNorms: ``"4"`` when w == a, else ``"w4a8"``."""
    return str(w_bits) if w_bits == a_bits else f"w{w_bits}a{a_bits}"


QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, QuantMultiheadAttention)
