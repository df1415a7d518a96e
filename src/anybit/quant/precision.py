"""Precision control: set, read and temporarily change the bit-widths of a converted model.

The state lives on the layers themselves (``w_bits``/``a_bits``), never in a module-global.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..inputs import is_keyword_inputs, num_samples
from .functional import FLOAT_BITS, BitsError, check_bits
from .modules import QUANT_LAYER_TYPES, SwitchableBatchNorm, precision_key

Bits = int | tuple[int, int] | Mapping


class NotConvertedError(ValueError):
    """A precision was set on a model that has no quantizable layer."""


class UnknownLayerError(ValueError):
    """A per-layer bit map names a layer the model does not have."""


def quant_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Quantizable layers of ``model`` by qualified name, in registration order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYER_TYPES)}


def _pair(value, what: str) -> tuple[int, int]:
    """Normalise ``4``, ``(4, 8)``, ``{"w": 4, "a": 8}`` or ``None`` to a checked ``(w, a)`` pair."""
    if value is None or isinstance(value, int):
        b = check_bits(value, what)
        return b, b
    if isinstance(value, Mapping) and set(value) <= {"w", "a"} and value:
        return check_bits(value.get("w", FLOAT_BITS), f"{what}.w"), check_bits(value.get("a", FLOAT_BITS), f"{what}.a")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return check_bits(value[0], f"{what}[0] (weight bits)"), check_bits(value[1], f"{what}[1] (activation bits)")
    raise BitsError(
        f"{what}={value!r} is not a precision: expected an int, a (weight_bits, activation_bits) pair "
        f"or {{'w': ..., 'a': ...}}"
    )


def _uniform_for_layer(layer: nn.Module, w: int, a: int) -> tuple[int, int]:
    if layer.pinned is None:
        return w, a
    pw, pa = layer.pinned
    return (FLOAT_BITS if w == FLOAT_BITS else pw), (FLOAT_BITS if a == FLOAT_BITS else pa)


def _switchable_bns(model: nn.Module) -> list[SwitchableBatchNorm]:
    return [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]


def set_precision(model: nn.Module, bits: Bits | None = None, *, w: int | None = None, a: int | None = None) -> nn.Module:
    """Set the precision of a converted model, in place; returns the model.

    ``bits`` is an int (weights and activations), a ``(w, a)`` pair, or a per-layer map
    ``{layer_name: int | (w, a) | {"w":.., "a":..}}``; ``w=``/``a=`` set them separately (the
    other stays 32 when only one is given with no ``bits``). Uniform settings leave pinned
    (first/last) layers at their pinned bits, or float when 32 is asked. A per-layer map sets
    exactly the named layers, pinned ones included, and leaves the others as they are.
    """
    layers = quant_layers(model)
    if not layers:
        raise NotConvertedError("this model has no quantizable layers: call anybit.convert(model) first")
    if isinstance(bits, Mapping) and not (set(bits) <= {"w", "a"} and bits):
        _set_layer_map(model, layers, bits)
        return model
    if bits is None:
        pair = (check_bits(w, "w"), check_bits(a, "a"))
    else:
        if w is not None or a is not None:
            raise BitsError("give either bits or w=/a=, not both")
        pair = _pair(bits, "bits")
    for layer in layers.values():
        layer.set_bits(*_uniform_for_layer(layer, *pair))
    for bn in _switchable_bns(model):
        bn.active = precision_key(*pair)
    return model


def _set_layer_map(model: nn.Module, layers: dict[str, nn.Module], bit_map: Mapping) -> None:
    unknown = [n for n in bit_map if n not in layers]
    if unknown:
        hints = {n: difflib.get_close_matches(n, layers, n=1) for n in unknown}
        listed = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
        raise UnknownLayerError(
            f"bit map names layers that are not quantizable layers of this model: {listed}; "
            f"see anybit.quantizable_layers(model) for the names"
        )
    pairs = {name: _pair(value, f"bits[{name!r}]") for name, value in bit_map.items()}
    bns = _switchable_bns(model)
    if bns:
        # The model must end up uniform (pinned layers aside), not just the map's entries.
        final = {name: pairs.get(name, (layer.w_bits, layer.a_bits)) for name, layer in layers.items()}
        distinct = {p for name, p in final.items() if layers[name].pinned is None} or set(final.values())
        if len(distinct) != 1:
            raise BitsError(
                "a model with switchable BatchNorm runs at one uniform precision only; "
                "per-layer bit maps need shared BatchNorm (QuantSpec(bn='shared'), the emqnet method)"
            )
        (pair,) = distinct
        for bn in bns:
            bn.active = precision_key(*pair)
    for name, pair in pairs.items():
        layers[name].set_bits(*pair)


def get_precision(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Current ``(w_bits, a_bits)`` of every quantizable layer."""
    return {name: (m.w_bits, m.a_bits) for name, m in quant_layers(model).items()}


@contextmanager
def precision(model: nn.Module, bits: Bits | None = None, *, w: int | None = None, a: int | None = None) -> Iterator[nn.Module]:
    """Run a block at another precision and restore the previous one afterwards, even on error.

    ``with anybit.precision(model, w=4, a=8): logits = model(x)``
    """
    saved = get_precision(model)
    saved_bn = [(bn, bn.active) for bn in _switchable_bns(model)]
    set_precision(model, bits, w=w, a=a)
    try:
        yield model
    finally:
        layers = quant_layers(model)
        for name, pair in saved.items():
            layers[name].set_bits(*pair)
        for bn, active in saved_bn:
            bn.active = active


@dataclass
class LayerInfo:
    """A quantizable layer: its weight parameter count and multiply-accumulates per sample."""

    name: str
    kind: str
    params: int
    macs: int | None
    w_bits: int
    a_bits: int
    pinned: tuple[int, int] | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _weight_params(layer: nn.Module) -> int:
    if isinstance(layer, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
        total = sum(getattr(layer, n).numel() for n in names if getattr(layer, n, None) is not None)
        return total + layer.out_proj.weight.numel()
    return layer.weight.numel()


def _macs(layer: nn.Module, inputs: tuple, output) -> int:
    """Multiply-accumulates of one call, divided by the batch size later."""
    if isinstance(layer, nn.Conv2d):
        out = output
        return out.numel() * (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    if isinstance(layer, nn.MultiheadAttention):
        query, key = inputs[0], inputs[1]
        e = layer.embed_dim
        q_tokens = query.numel() // query.shape[-1]
        kv_tokens = key.numel() // key.shape[-1]
        # q and output projections per query token; k and v projections per key token
        return 2 * q_tokens * e * e + kv_tokens * e * (layer.kdim + layer.vdim)
    raise TypeError(type(layer).__name__)


@torch.no_grad()
def quantizable_layers(model: nn.Module, example_input: torch.Tensor | tuple | None = None) -> list[LayerInfo]:
    """List quantizable layers with weight parameter counts and, given an example input
    (batch of one or more: a tensor, a tuple of positional inputs or a dict of keyword inputs),
    multiply-accumulates per sample (``macs`` is ``None`` otherwise).

    With an example input, converted layers whose own forward never runs (their parent uses the weight
    directly) are first turned back into float layers and reported (:func:`anybit.quant.check_layers_run`):
    they are never listed as quantizable."""
    if not quant_layers(model):
        raise NotConvertedError("this model has no quantizable layers: call anybit.convert(model) first")
    if example_input is not None:
        from .convert import check_layers_run

        check_layers_run(model, example_input)
    layers = quant_layers(model)
    if not layers:
        raise NotConvertedError("no layer of this model runs its quantized forward: nothing is quantizable")
    macs: dict[str, int] = {}
    if example_input is not None:
        keyword = is_keyword_inputs(example_input)
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        batch = num_samples(example_input) if keyword else args[0].shape[0]
        hooks = [
            layer.register_forward_hook(
                lambda mod, inp, out, n=name: macs.__setitem__(
                    n, macs.get(n, 0) + _macs(mod, inp, out[0] if isinstance(out, tuple) else out)
                )
            )
            for name, layer in layers.items()
        ]
        was_training = model.training
        try:
            model.eval()
            with precision(model, FLOAT_BITS):
                model(**example_input) if keyword else model(*args)
        finally:
            model.train(was_training)
            for h in hooks:
                h.remove()
        macs = {n: v // batch for n, v in macs.items()}
    return [
        LayerInfo(name, type(layer).__name__, _weight_params(layer), macs.get(name) if example_input is not None else None,
                  layer.w_bits, layer.a_bits, layer.pinned)
        for name, layer in layers.items()
    ]
