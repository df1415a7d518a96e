"""Float copies of models and the conversion PTQ applies.

PTQ always works on a copy: the float model stays untouched as the reference that targets and
KL divergences are computed against. A model that was already converted (for example a multi-bit
network) is turned back into plain float layers first, taking its 32-bit weights, so that PTQ's
own quantizers (asymmetric, per-channel) are used and its weights may be changed freely.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from ..quant import (
    DEFAULT_KEEP_FIRST_LAST,
    QUANT_LAYER_TYPES,
    ActivationPoint,
    QuantAct,
    QuantSpec,
    SwitchableBatchNorm,
    convert,
    float_layer,
)
from .errors import PTQError

PTQ_SPEC = QuantSpec(weight="asymmetric", weight_per_channel=True, act="learned")
"""How PTQ converts a float model: per-channel asymmetric weights, per-tensor activation ranges."""

_FLOAT_TYPES = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
_CONVERSION_KEYS = ("quant_spec", "conversion", "checkpoint", "ptq")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


_plain = float_layer


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` made only of float layers (its 32-bit behaviour, exactly).

    Quantizable layers become ``nn.Conv2d``/``nn.Linear``/``nn.MultiheadAttention`` with the same
    weights, quantized activations (:class:`~anybit.quant.QuantAct`) their float ``ActivationPoint``;
    switchable BatchNorms become their 32-bit BatchNorm. A float model is simply copied.
    A model whose layers clip their inputs at 32 bits (emqnet) is refused with :class:`PTQError`.
    """
    clipped = [n for n, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)
               and m.pinned is None and getattr(m.input_quant, "clip_float", False)]
    if clipped:
        raise PTQError(
            f"this model clips the inputs of {len(clipped)} layers (e.g. {clipped[0]}) to the activation range even "
            f"at 32 bits (it was trained with emqnet, QuantSpec(act_clip_float=True)), and plain float layers "
            f"cannot reproduce that, so post-training quantization would start from a different network. A "
            f"multi-bit model needs no calibration: evaluate it with anybit eval RUN --bits ..., or allocate "
            f"bits per layer with anybit mixed RUN --budget ..."
        )
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QUANT_LAYER_TYPES):
            _set_submodule(model, name, _plain(module))
        elif isinstance(module, QuantAct):
            _set_submodule(model, name, ActivationPoint(module.role))
        elif isinstance(module, SwitchableBatchNorm):
            if "32" not in module.bns:
                raise PTQError(
                    f"{name} is a switchable BatchNorm without a full-precision (32-bit) one "
                    f"(it has {sorted(module.bns.keys())}): PTQ needs the float model; train with 32 in the bit list"
                )
            _set_submodule(model, name, module.bns["32"])
    meta = {k: v for k, v in (getattr(model, "anybit_meta", None) or {}).items() if k not in _CONVERSION_KEYS}
    model.anybit_meta = meta
    return model


def check_quantizable(model: nn.Module) -> list[str]:
    """Names of the layers PTQ can quantize; raises :class:`PTQError` if there is none."""
    if not isinstance(model, nn.Module):
        raise PTQError(f"PTQ expects an nn.Module, got {type(model).__name__}")
    names = [n for n, m in model.named_modules() if type(m) in _FLOAT_TYPES or isinstance(m, QUANT_LAYER_TYPES)]
    if not names:
        raise PTQError(
            f"{type(model).__name__} has no layer anybit can quantize (nn.Conv2d, nn.Linear, "
            f"nn.MultiheadAttention): nothing to calibrate"
        )
    return names


def ptq_convert(float_model: nn.Module, keep_first_last: int | None = DEFAULT_KEEP_FIRST_LAST, skip: tuple[str, ...] = (),
                example=None, **spec_fields) -> nn.Module:
    """A quantizable deep copy of a float model, converted with :data:`PTQ_SPEC` (``spec_fields`` override
    it). With ``example`` (a small batch of inputs) the first and last layers are found in execution
    order (:func:`anybit.quant.convert.execution_ends`), not in registration order."""
    model = copy.deepcopy(float_model)
    spec = QuantSpec(**{**PTQ_SPEC.to_dict(), "keep_first_last": keep_first_last, "skip": tuple(skip), **spec_fields})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers left in float are listed in the conversion report
        return convert(model, spec, example_input=example)
