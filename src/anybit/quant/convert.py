"""``anybit.convert``: make any ``nn.Module`` tree quantizable in place."""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field

import torch
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


@torch.no_grad()
def execution_ends(model: nn.Module, names: list[str], example) -> tuple[list[str], list[str]]:
    """The first and last of the layers ``names`` of ``model`` in execution order on ``example`` (a batch of
    inputs: a tensor or a dict of keyword tensors).

    First: the layer that runs first, with every layer that reads the same input tensor (a transformer's
    query, key and value projections). Last: the last layer to run among those the model's compared
    output (logits, or hidden states for a feature extractor) depends on, with the layers that share its
    input -- a layer whose output does not reach it (BERT's pooler, for a model compared on its hidden
    states) is not "last". Layers that never run are neither.
    """
    from ..evaluation import compared_output
    from ..inputs import run_model

    wanted = set(names)
    order: list[str] = []
    first_input: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            if name not in first_input:
                order.append(name)
                first_input[name] = args[0] if args and isinstance(args[0], torch.Tensor) else None
        return fn

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            _, out = compared_output(run_model(model, example))
            weights = {n: modules[n].weight for n in names if isinstance(getattr(modules[n], "weight", None),
                                                                          torch.Tensor)}
            used = set(wanted)
            if out.requires_grad and weights:
                grads = torch.autograd.grad(out.float().sum(), list(weights.values()), allow_unused=True)
                used = {n for n, g in zip(weights, grads) if g is not None}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    ran = [n for n in order if n in wanted]
    if not ran:
        return [], []

    def sharing(name: str) -> list[str]:
        x = first_input[name]
        return [n for n in ran if n == name or (x is not None and first_input[n] is x)]

    live = [n for n in ran if n in used] or ran
    return sharing(ran[0]), sharing(live[-1])


def convert(model: nn.Module, spec: QuantSpec | None = None, example_input=None, **overrides) -> nn.Module:
    """Swap ``nn.Conv2d``/``nn.Linear``/``nn.MultiheadAttention`` for quantizable layers, in place.

    Returns the same model object, at full precision (outputs unchanged) until
    :func:`anybit.set_precision` lowers it. ``spec`` fields may be given as keyword arguments
    (``convert(model, weight="symmetric", keep_first_last=8)``). Layers of other types that carry
    a weight matrix (``Conv1d``, ``Embedding``, subclasses with their own forward, ...) stay float
    and are listed in the report (``model.anybit_meta["conversion"]``) and in a warning. Activations a
    model marks with :class:`~anybit.quant.ActivationPoint` become :class:`~anybit.quant.QuantAct` where
    ``spec.attn_matmul``/``spec.attn_softmax`` ask for it (report key ``activations``).
    ``keep_first_last`` pins the first and last converted layers in registration order, or -- given
    ``example_input`` (a small batch) -- in execution order (:func:`execution_ends`: the first layer with
    those sharing its input; the last layer the output depends on).
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
                                         signed=spec.act_signed,
                                         granularity="tensor" if qcls is QuantConv2d else spec.act_granularity),
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
        if example_input is not None:
            first, last = execution_ends(model, report.converted, example_input)
            ends = set(first) | set(last)
        else:
            ends = {report.converted[0], report.converted[-1]}
        for name in report.converted:
            if name in ends:
                layer = model.get_submodule(name)
                layer.pinned = (spec.keep_first_last, spec.keep_first_last)
                report.pinned.append(name)
    if spec.keep_first_last is not None and len(report.pinned) == len(report.converted):
        warnings.warn(
            f"anybit.convert pinned every quantizable layer of {type(model).__name__} at keep_first_last="
            f"{spec.keep_first_last} (its {len(report.converted)} layer(s) are the first and the last), so no layer "
            f"follows set_precision: nothing is left to quantize. Use keep_first_last=None to quantize them",
            stacklevel=2)
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


def float_layer(layer: nn.Module) -> nn.Module:
    """The plain ``nn.Conv2d``/``nn.Linear``/``nn.MultiheadAttention`` of a quantizable layer, sharing its
    parameter and buffer objects (its 32-bit behaviour, exactly)."""
    if isinstance(layer, QuantConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                          bias=layer.bias is not None, padding_mode=layer.padding_mode, device="meta")
    elif isinstance(layer, QuantLinear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    elif isinstance(layer, QuantMultiheadAttention):
        plain = nn.MultiheadAttention(
            layer.embed_dim, layer.num_heads, dropout=layer.dropout, bias=layer.in_proj_bias is not None,
            add_bias_kv=layer.bias_k is not None, add_zero_attn=layer.add_zero_attn, kdim=layer.kdim,
            vdim=layer.vdim, batch_first=layer.batch_first, device="meta",
        )
        plain.out_proj = layer.out_proj
    else:
        raise TypeError(f"{type(layer).__name__} is not a quantizable layer")
    for name, p in layer.named_parameters(recurse=False):
        setattr(plain, name, p)
    for name, b in layer.named_buffers(recurse=False):
        setattr(plain, name, b)
    plain.train(layer.training)
    return plain


def check_layers_run(model: nn.Module, example_input, warn: bool = True) -> list[str]:
    """Run ``model`` once on ``example_input`` (float, eval mode, no gradients) and turn every converted
    layer whose own forward never ran back into a float layer; returns their names.

    A parent module that hands a layer's weight to a function itself (torchvision's Swin passes
    ``attn.qkv.weight`` to ``F.linear``) bypasses the quantized forward: such a layer would be
    "converted" but run in float. It is reported as left in float instead (``conversion_report(model)``:
    ``not_run`` and ``unsupported``; added to the spec's ``skip`` so that a saved checkpoint reloads the
    same way), and first/last pinning moves to the first and last layers that do run."""
    import torch

    from ..inputs import is_keyword_inputs
    from .functional import FLOAT_BITS
    from .precision import get_precision, quant_layers

    layers = quant_layers(model)
    if not layers:
        return []
    ran: set[str] = set()
    hooks = [layer.register_forward_pre_hook(lambda _m, _i, n=name: ran.add(n)) for name, layer in layers.items()]
    saved = get_precision(model)
    was_training = model.training
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    bns = [(m, m.active) for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    try:
        for bn, active in bns:
            if active not in bn.bns:
                bn.active = next(iter(bn.bns.keys()))
        model.eval()
        for layer in layers.values():
            layer.set_bits(FLOAT_BITS, FLOAT_BITS)
        with torch.no_grad():
            model(**example_input) if is_keyword_inputs(example_input) else model(*args)
    finally:
        model.train(was_training)
        for name, pair in saved.items():
            layers[name].set_bits(*pair)
        for h in hooks:
            h.remove()
        for bn, active in bns:
            bn.active = active
    idle = [n for n in layers if n not in ran]
    if not idle:
        return []
    meta = dict(getattr(model, "anybit_meta", {}) or {})
    report = dict(meta.get("conversion") or {})
    spec = dict(meta.get("quant_spec") or {})
    keep = spec.get("keep_first_last")
    for name in idle:
        _set_submodule(model, name, float_layer(layers[name]))
    remaining = [n for n in layers if n not in idle]
    pinned = []
    if keep is not None and remaining:
        ends = {remaining[0], remaining[-1]}
        for name in remaining:
            layer = layers[name]
            layer.pinned = (keep, keep) if name in ends else None
            if name in ends:
                pinned.append(name)
                layer.set_bits(*(p if p == FLOAT_BITS else keep for p in saved[name]))
    report["converted"] = [n for n in report.get("converted", list(layers)) if n not in idle]
    report["pinned"] = pinned if keep is not None else report.get("pinned", [])
    report["not_run"] = sorted(set(report.get("not_run", [])) | set(idle))
    report["unsupported"] = [*report.get("unsupported", []),
                             *({"name": n, "type": f"{type(layers[n]).__name__} (weight used outside its forward)"}
                               for n in idle)]
    spec["skip"] = [*spec.get("skip", []), *idle]
    meta.update(conversion=report, quant_spec=spec)
    model.anybit_meta = meta
    if warn:
        listed = ", ".join(idle[:4]) + (f" and {len(idle) - 4} more" if len(idle) > 4 else "")
        warnings.warn(f"{len(idle)} of {len(layers)} converted layers never ran their own forward (their parent "
                      f"module uses their weights directly): left in float, not quantized: {listed}",
                      stacklevel=2)
    return idle
