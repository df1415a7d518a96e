"""Activation range calibration for converted models that were not trained quantized."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..inputs import InputsError, as_inputs, is_keyword_inputs, real_positions, run_model, to_device
from .functional import FLOAT_BITS
from .modules import QuantAct
from .precision import quant_layers


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: Iterable, num_batches: int | None = None,
                          device: str | torch.device | None = None) -> int:
    """Set every quantizable layer's shared activation range to the min/max of its float inputs
    over ``data`` (batches of ``(x, y)``, ``x`` or keyword inputs such as a tokenizer's output);
    returns the number of layers calibrated.

    Layers run in float while observing; switchable BatchNorms stay at the model's current precision.
    Quantized attention matmul inputs (:class:`~anybit.quant.QuantAct` of role ``"matmul"``) are
    calibrated too; probabilities and softmax inputs keep their fixed grids.
    A single tensor or dict of tensors is taken as one batch of inputs; a Dataset (of ``x`` or ``(x, y)``
    items) is read in batches of 64, as :func:`anybit.ptq.quantize` takes one. Padding (positions where a
    keyword batch's ``attention_mask`` is 0) is left out of the ranges.
    """
    if isinstance(data, torch.Tensor) or is_keyword_inputs(data):
        data = [data]
    elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=64, shuffle=False)
    layers = quant_layers(model)
    observed = {**layers, **{name: m for name, m in model.named_modules()
                             if isinstance(m, QuantAct) and m.role == "matmul"}}
    lows: dict[str, torch.Tensor] = {}
    highs: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(module, inputs):
            x = inputs[0].detach()
            # (attention matmul inputs, (batch, heads, tokens, dim), have no smoothing and no padding rows)
            x = x if isinstance(module, QuantAct) else real_positions(module.smooth_input(x))
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
            if not (isinstance(x, torch.Tensor) or is_keyword_inputs(x)):
                raise InputsError(f"calibrate_activations got a batch of type {type(x).__name__}: expected a tensor, "
                                f"(x, y) or a dict of input tensors")
            if is_keyword_inputs(x):
                x = as_inputs(x)
            run_model(model, to_device(x, device))
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
