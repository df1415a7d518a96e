"""Layer set-up hooks: prepare one layer of a post-training-quantized model to run at one precision.

A *layer setup* is any callable ``layer_setup(model, layer_name, w_bits, a_bits) -> None`` that
calibrates layer ``layer_name`` so that it runs well at ``(w_bits, a_bits)``. The allocator calls it
before it measures a layer at an option, and again for every layer's chosen option before the
allocation is used (:func:`anybit.mixed.prepare`). The contract:

- it finds its calibration data itself (a closure or an object holding it);
- it is called with the model at the reference precision and may run the model; the precision it
  leaves behind is restored by the caller;
- whatever it calibrates is kept *per bit-width* (``WeightQuantizer.set_range(bits, ...)``,
  ``ActQuantizer.set_range(bits, ...)``), so that the set-ups for every option of every layer
  coexist and any allocation can be applied afterwards;
- calling it twice with the same arguments gives the same result (it may skip the work);
- an optional ``cache_key`` attribute (a string) names it in the sensitivity cache fingerprint.

:class:`MinMaxSetup` is the simple one: activation ranges from the observed min/max of each layer's
input in the float model; weights keep the quantizer's own per-channel min/max grid.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..inputs import real_positions, run_model, to_device
from ..quant import FLOAT_BITS, precision, quant_layers
from .calib import calibration_batches
from .errors import MixedPrecisionError

LayerSetup = Callable[[nn.Module, str, int, int], None]


class MinMaxSetup:
    """Min/max range calibration as a ``layer_setup``: ``input_quant.set_range(a_bits, lo, hi)`` with
    ``lo``/``hi`` the min/max of the layer's input over the calibration data, measured once in the
    float model (every layer sees float inputs, AdaQuant's parallel mode). A range already calibrated
    for that bit-width (for example by ``anybit.ptq``) is kept unless ``overwrite=True``."""

    cache_key = "minmax-v1"

    def __init__(self, calib_data, batch_size: int = 256, device: str | torch.device | None = None,
                 overwrite: bool = False) -> None:
        self.batches = calibration_batches(calib_data, batch_size, device)
        self.overwrite = overwrite
        self._stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._model_ref: weakref.ref | None = None

    @torch.no_grad()
    def observe(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Min and max of every quantizable layer's (first) input, running the model in float."""
        layers = quant_layers(model)
        stats: dict[str, list[torch.Tensor]] = {}

        def hook(module, args, name):
            x = real_positions(module.smooth_input(args[0].detach()))
            lo, hi = x.amin(), x.amax()
            if name in stats:
                stats[name] = [torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)]
            else:
                stats[name] = [lo, hi]

        handles = [layer.register_forward_pre_hook(lambda m, a, n=name: hook(m, a, n)) for name, layer in layers.items()]
        was_training = model.training
        model.eval()
        try:
            with precision(model, FLOAT_BITS):
                device = next((p.device for p in model.parameters()), None)
                for x, _ in self.batches:
                    run_model(model, to_device(x, device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self._stats = {name: (lo.clone(), hi.clone()) for name, (lo, hi) in stats.items()}
        self._model_ref = weakref.ref(model)
        return self._stats

    def __call__(self, model: nn.Module, layer_name: str, w_bits: int, a_bits: int) -> None:
        if a_bits == FLOAT_BITS:
            return
        layer = model.get_submodule(layer_name)
        if getattr(layer.input_quant, "dynamic", False):
            return  # per-token ranges are computed at run time
        if not self.overwrite and a_bits in layer.input_quant.calibrated_bits():
            return  # calibrated before (by this set-up, or by a better one such as PTQ's MSE search)
        if self._model_ref is None or self._model_ref() is not model:
            self.observe(model)
        if layer_name not in self._stats:
            raise MixedPrecisionError(f"layer {layer_name!r} did not run on the calibration data; cannot calibrate "
                                      f"its range")
        lo, hi = self._stats[layer_name]
        layer.input_quant.set_range(a_bits, lo, hi, learnable=False)


def needs_calibration(model: nn.Module, a_bits: Iterable[int] | None = None) -> bool:
    """True if some activation quantizer would have no range to use: its shared range was never learnt
    (a float model converted for post-training quantization) and it has no calibrated range for one of
    ``a_bits`` (or none at all when ``a_bits`` is None). Pinned layers are checked at their pins."""
    for layer in quant_layers(model).values():
        quant = getattr(layer, "input_quant", None)
        if quant is None or bool(getattr(quant, "initialized", True)):
            continue
        have = set(quant.calibrated_bits())
        wanted = {layer.pinned[1]} if layer.pinned is not None else (set(a_bits) if a_bits is not None else None)
        if wanted is None:
            if not have:
                return True
        elif any(b != FLOAT_BITS and b not in have for b in wanted):
            return True
    return False
