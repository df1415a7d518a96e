"""``QuantSpec``: everything about how a model is quantized, in one small dataclass that is
validated up front and written to (and read back from) a checkpoint's JSON sidecar."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .batchnorm import UNTRAINED_RULES
from .functional import ACT_GRANULARITIES, WEIGHT_QUANTIZERS, check_bits


class SpecError(ValueError):
    """An invalid quantization setting."""


DEFAULT_KEEP_FIRST_LAST = 8
"""The one rule for the first and last quantizable layers: pinned at 8 bits unless told otherwise (``QuantSpec``,
``anybit.convert``, ``anybit.ptq``, ``anybit mixed`` on float checkpoints). Multi-bit training pins them at 32
instead (``TrainConfig.keep_first_last``): its fixed [0, 1] activation clip would destroy the first layer's signed
input at any integer precision. ``None`` quantizes them like every other layer."""


@dataclass(frozen=True)
class QuantSpec:
    """How :func:`anybit.convert` quantizes a model.

    weight: weight quantizer, ``"symmetric"`` (default: per-channel, approximates a float model),
        ``"asymmetric"`` or ``"dorefa"`` (Any-Precision style, the multi-bit training methods' choice).
    weight_per_channel: per-output-channel ranges; ``None`` = per-tensor for dorefa, per-channel otherwise.
    act: activation range ``"learned"`` (LSQ-style, starts at the first batch's min/max) or ``"fixed"``.
    act_range: the fixed range (or the starting value of a learned one before data is seen).
    act_granularity: ``"tensor"`` (one range per layer input, learnt or calibrated) or ``"token"`` (dynamic:
        a range per row -- per token of a transformer -- computed from each input at run time; Linear and
        MultiheadAttention inputs only, Conv2d inputs keep one range per tensor).
    act_clip_float: also clip the input of every quantizable layer that is not pinned to the activation
        range at 32 bits (a clipped-ReLU float path), so that one shared BatchNorm sees the same activation
        distribution at every precision (the emqnet method). Off: 32 bits is exactly the float model.
    wbc: weight bias correction (per-channel mean/std of the quantized weight matched to the float one).
    wbc_detach: treat the correction's statistics as constants in the backward pass.
    bn: ``"shared"`` (one BatchNorm for all precisions) or ``"switchable"`` (one per precision in ``bn_bits``).
    bn_stats: with ``bn="shared"``: ``"shared"`` (one set of running statistics for every precision) or
        ``"per-precision"`` (the affine terms shared, running statistics per precision in ``bn_bits``:
        :class:`~anybit.quant.PrecisionBatchNorm2d`).
    bn_untrained: how a per-precision BatchNorm derives statistics for a precision not in ``bn_bits``:
        ``"interpolate"``, ``"nearest"`` or ``"shared"`` (see ``PrecisionBatchNorm2d.statistics``).
    bn_bits: precisions that get their own BatchNorm (``bn="switchable"``) or their own statistics
        (``bn_stats="per-precision"``).
    keep_first_last: pin the first and last quantizable layers at this bit-width (default 8,
        :data:`DEFAULT_KEEP_FIRST_LAST`; ``None``: not pinned).
    skip: layer names or glob patterns left in float.
    act_signed: a symmetric activation grid over ``[-r, r]``, ``r = max|act_range|`` (1 bit: ``{0, r}``), for
        signed inputs such as LayerNorm outputs; off: the unsigned grid over ``act_range`` widened to 0.
    attn_matmul: quantize the inputs of the attention matmuls a model marks with
        :class:`~anybit.quant.ActivationPoint` (q, k and v with the activation quantizer above, the attention
        probabilities on a fixed [0, 1] grid), at the activation bits of the layer that computed q, k and v.
    attn_softmax: quantize the softmax input so marked (the scores minus their row maximum, on a fixed grid
        over [-8, 0]).
    """

    weight: str = "symmetric"
    weight_per_channel: bool | None = None
    act: str = "learned"
    act_range: tuple[float, float] = (0.0, 1.0)
    act_granularity: str = "tensor"
    act_clip_float: bool = False
    wbc: bool = False
    wbc_detach: bool = True
    bn: str = "shared"
    bn_stats: str = "shared"
    bn_untrained: str = "interpolate"
    bn_bits: tuple[int, ...] = ()
    keep_first_last: int | None = DEFAULT_KEEP_FIRST_LAST
    skip: tuple[str, ...] = field(default_factory=tuple)
    act_signed: bool = False
    attn_matmul: bool = False
    attn_softmax: bool = False

    def __post_init__(self) -> None:
        if self.weight not in WEIGHT_QUANTIZERS:
            raise SpecError(f"weight={self.weight!r} is unknown: expected one of {sorted(WEIGHT_QUANTIZERS)}")
        if self.act not in ("learned", "fixed"):
            raise SpecError(f"act={self.act!r} is unknown: expected 'learned' or 'fixed'")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise SpecError(f"act_granularity={self.act_granularity!r} is unknown: expected one of "
                            f"{list(ACT_GRANULARITIES)}")
        if self.bn not in ("shared", "switchable"):
            raise SpecError(f"bn={self.bn!r} is unknown: expected 'shared' or 'switchable'")
        if self.bn_stats not in ("shared", "per-precision"):
            raise SpecError(f"bn_stats={self.bn_stats!r} is unknown: expected 'shared' or 'per-precision'")
        if self.bn_untrained not in UNTRAINED_RULES:
            raise SpecError(f"bn_untrained={self.bn_untrained!r} is unknown: expected one of "
                            f"{', '.join(UNTRAINED_RULES)}")
        if self.bn_stats == "per-precision" and self.bn != "shared":
            raise SpecError("bn_stats='per-precision' keeps one BatchNorm's affine terms for every precision "
                            "(bn='shared'); switchable BatchNorm already has everything per precision")
        object.__setattr__(self, "act_range", tuple(float(v) for v in self.act_range))
        object.__setattr__(self, "bn_bits", tuple(check_bits(b, "bn_bits") for b in self.bn_bits))
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.bn == "switchable" and not self.bn_bits:
            raise SpecError("bn='switchable' needs bn_bits, the precisions that get their own BatchNorm")
        if self.bn_stats == "per-precision" and not self.bn_bits:
            raise SpecError("bn_stats='per-precision' needs bn_bits, the precisions that get their own statistics")
        if self.keep_first_last is not None:
            check_bits(self.keep_first_last, "keep_first_last")
        for name in ("act_signed", "attn_matmul", "attn_softmax"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name}={getattr(self, name)!r} must be True or False")

    @property
    def per_channel(self) -> bool:
        if self.weight_per_channel is None:
            return self.weight != "dorefa"
        return self.weight_per_channel

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SpecError(f"unknown quantization settings {sorted(unknown)}: expected some of {sorted(known)}")
        return cls(**data)
