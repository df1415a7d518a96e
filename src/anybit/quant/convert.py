"""``anybit.convert``: make any ``nn.Module`` tree quantizable in place."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

from torch import nn

from .modules import (
    QUANT_LAYER_TYPES,
    ActivationPoint,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    SwitchableBatchNorm,
    SOFTMAX_INPUT_RANGE,
    precision_key,
)
from .batchnorm import PrecisionTrace, precision_batchnorm, stats_key
from .quantizers import ActQuantizer, WeightQuantizer
from .spec import QuantSpec

# Exact types only: a subclass may override forward, and swapping it would change the model.
_CONVERTERS = {
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
    nn.MultiheadAttention: QuantMultiheadAttention,
}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class ConversionReport:
    """What :func:`convert` did: layers quantized, skipped on request, pinned, and left in float."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    switchable_bn: list[str] = field(default_factory=list)
    precision_bn: list[str] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "converted": self.converted,
            "skipped": self.skipped,
            "pinned": self.pinned,
            "unsupported": [{"name": n, "type": t} for n, t in self.unsupported],
            "switchable_bn": self.switchable_bn,
            "precision_bn": self.precision_bn,
            "activations": self.activations,
        }


class NothingToQuantizeError(ValueError):
    """A model without a single quantizable layer."""


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _has_matrix_weight(module: nn.Module) -> bool:
    w = module._parameters.get("weight")
    return w is not None and w.dim() >= 2


def _activation_quantizer(role: str, spec: QuantSpec) -> ActQuantizer | None:
    """The quantizer of an :class:`ActivationPoint` of ``role``, or None where ``spec`` leaves it in float."""
    if role == "softmax_input":
        return ActQuantizer("fixed", SOFTMAX_INPUT_RANGE) if spec.attn_softmax else None
    if not spec.attn_matmul:
        return None
    if role == "probabilities":
        return ActQuantizer("fixed", (0.0, 1.0))
    return ActQuantizer(spec.act, spec.act_range, signed=spec.act_signed)


def convert(model: nn.Module, spec: QuantSpec | None = None, **overrides) -> nn.Module:
    """Swap ``nn.Conv2d``/``nn.Linear``/``nn.MultiheadAttention`` for quantizable layers, in place.

    Returns the same model object, at full precision (outputs unchanged) until
    :func:`anybit.set_precision` lowers it. ``spec`` fields may be given as keyword arguments
    (``convert(model, weight="symmetric", keep_first_last=8)``). Layers of other types that carry
    a weight matrix (``Conv1d``, ``Embedding``, subclasses with their own forward, ...) stay float
    and are listed in the report (``model.anybit_meta["conversion"]``) and in a warning. Activations a
    model marks with :class:`~anybit.quant.ActivationPoint` become :class:`~anybit.quant.QuantAct` where
    ``spec.attn_matmul``/``spec.attn_softmax`` ask for it (report key ``activations``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    spec = QuantSpec(**{**(spec.to_dict() if spec else {}), **overrides}) if overrides or spec is None \
        else spec
    if any(isinstance(m, QUANT_LAYER_TYPES) for m in model.modules()):
        raise ValueError("this model is already converted: convert() expects a float model")

    report = ConversionReport()
    inside_converted: list[str] = []
    for name, module in list(model.named_modules()):
        if not name or any(name.startswith(p + ".") for p in inside_converted):
            continue
        qcls = _CONVERTERS.get(type(module))
        if qcls is not None:
            inside_converted.append(name)
            if _matches(name, spec.skip):
                report.skipped.append(name)
                continue
            quant = qcls.from_float(
                module,
                weight_quant=WeightQuantizer(spec.weight, spec.per_channel),
                input_quant=ActQuantizer(spec.act, spec.act_range, clip_float=spec.act_clip_float,
                                         signed=spec.act_signed),
                wbc=spec.wbc,
                wbc_detach=spec.wbc_detach,
            )
            _set_submodule(model, name, quant)
            report.converted.append(name)
        elif type(module) is ActivationPoint and not _matches(name, spec.skip):
            quantizer = _activation_quantizer(module.role, spec)
            if quantizer is not None:
                _set_submodule(model, name, QuantAct(module.role, quantizer).train(module.training))
                report.activations.append(name)
        elif _has_matrix_weight(module) and not _matches(name, spec.skip):
            report.unsupported.append((name, type(module).__name__))
        elif isinstance(module, _BN_TYPES) and spec.bn == "switchable":
            keys = [precision_key(b, b) for b in spec.bn_bits]
            _set_submodule(model, name, SwitchableBatchNorm(module, keys))
            report.switchable_bn.append(name)
        elif type(module) in _BN_TYPES and spec.bn_stats == "per-precision" and module.track_running_stats:
            keys = [stats_key(b, b) for b in spec.bn_bits]
            _set_submodule(model, name, precision_batchnorm(module, keys, spec.bn_untrained))
            report.precision_bn.append(name)

    if not report.converted:
        raise NothingToQuantizeError(
            f"{type(model).__name__} has no layer anybit can quantize (nn.Conv2d, nn.Linear, "
            f"nn.MultiheadAttention); left in float: {[n for n, _ in report.unsupported] or 'nothing'}"
        )
    if report.precision_bn or report.activations:
        # quantizable layers tell the BatchNorms and activation quantizers after them their precision
        trace = PrecisionTrace()
        for name in report.converted + report.precision_bn + report.activations:
            model.get_submodule(name).precision_trace = trace
    if spec.keep_first_last is not None:
        ends = {report.converted[0], report.converted[-1]}
        for name in report.converted:
            if name in ends:
                layer = model.get_submodule(name)
                layer.pinned = (spec.keep_first_last, spec.keep_first_last)
                report.pinned.append(name)
    if report.unsupported:
        listed = ", ".join(f"{n} ({t})" for n, t in report.unsupported[:8])
        more = f" and {len(report.unsupported) - 8} more" if len(report.unsupported) > 8 else ""
        warnings.warn(f"anybit.convert left these layers in float (no quantized version): {listed}{more}",
                      stacklevel=2)

    meta = dict(getattr(model, "anybit_meta", {}) or {})
    meta["quant_spec"] = spec.to_dict()
    meta["conversion"] = report.to_dict()
    model.anybit_meta = meta
    return model


def conversion_report(model: nn.Module) -> dict:
    """The report :func:`convert` stored on ``model``."""
    meta = getattr(model, "anybit_meta", None) or {}
    if "conversion" not in meta:
        raise ValueError("this model was not converted by anybit.convert")
    return meta["conversion"]
