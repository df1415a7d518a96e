"""Activation range calibration for converted models that were not trained quantized."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .functional import FLOAT_BITS
from .modules import QuantAct
from .precision import quant_layers


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: Iterable, num_batches: int | None = None,
                          device: str | torch.device | None = None) -> int:
    """Set every quantizable layer's shared activation range to the min/max of its float inputs
    over ``data`` (batches of ``(x, y)`` or ``x``); returns the number of layers calibrated.

    Quantized attention matmul inputs (:class:`~anybit.quant.QuantAct` of role ``"matmul"``) are
    calibrated too; probabilities and softmax inputs keep their fixed grids. Layers run in float while
    observing; switchable BatchNorms stay at the model's current precision. A single tensor is taken as
    one batch of inputs.
    """
    if isinstance(data, torch.Tensor):
        data = [data]
    layers = quant_layers(model)
    observed = {**layers, **{name: m for name, m in model.named_modules()
                             if isinstance(m, QuantAct) and m.role == "matmul"}}
    lows: dict[str, torch.Tensor] = {}
    highs: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(_module, inputs):
            x = inputs[0].detach()
            lo, hi = x.amin(), x.amax()
            lows[name] = torch.minimum(lows[name], lo) if name in lows else lo
            highs[name] = torch.maximum(highs[name], hi) if name in highs else hi
        return hook

    hooks = [layer.register_forward_pre_hook(observe(name)) for name, layer in observed.items()]
    was_training = model.training
    model.eval()
    saved = {name: (layer.w_bits, layer.a_bits) for name, layer in layers.items()}
    for layer in layers.values():
        layer.set_bits(FLOAT_BITS, FLOAT_BITS)
    try:
        for i, batch in enumerate(data):
            if num_batches is not None and i >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device) if device is not None else x)
    finally:
        model.train(was_training)
        for name, bits in saved.items():
            layers[name].set_bits(*bits)
        for h in hooks:
            h.remove()
    if not lows:
        raise ValueError("calibrate_activations got no data: pass a non-empty loader of (x, y) or x batches")
    for name, lo in lows.items():
        observed[name].input_quant.init_range(lo, highs[name])
    return len(lows)
