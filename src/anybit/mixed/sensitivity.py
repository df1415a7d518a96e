"""Per-layer sensitivity: how much the loss grows when one layer alone runs at a lower precision.

``ΔL[l, b] = loss(layer l at option b, every other layer at the reference precision) − loss(reference)``,
with the loss the KL divergence from the float model's output distribution (no labels needed) or,
when asked for and labels are given, the cross-entropy. Pinned (first/last) layers are not measured:
they stay at their pinned precision throughout, in the reference too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import write_json
from ..inputs import num_samples, take
from ..progress import progress
from ..quant import (
    FLOAT_BITS,
    BitsError,
    SwitchableBatchNorm,
    check_bits,
    check_layers_run,
    get_precision,
    quant_layers,
    set_precision,
)
from .calib import calibration_batches, check_loss, data_fingerprint, dataset_loss, float_targets, model_fingerprint
from .errors import MixedBitsError, MixedPrecisionError
from .options import Option, option_label, resolve_options
from .setup import LayerSetup

ZERO_DELTA = 1e-12       # |ΔL| at or below this at every option: the layer does not affect the loss
CACHE_FORMAT = "anybit-sensitivity"
CACHE_VERSION = 1


@dataclass
class Sensitivity:
    """ΔL of every free layer (rows) at every option (columns), and what it was measured on."""

    layers: list[str]
    options: list[Option]
    delta: np.ndarray
    reference_loss: float
    loss: str = "kl"
    reference: Option = (FLOAT_BITS, FLOAT_BITS)
    pinned: dict[str, Option] = field(default_factory=dict)
    samples: int = 0
    fingerprint: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    from_cache: bool = False

    def __post_init__(self) -> None:
        self.delta = np.asarray(self.delta, dtype=np.float64).reshape(len(self.layers), len(self.options))
        self.options = [tuple(o) for o in self.options]
        self.reference = tuple(self.reference)
        self.pinned = {n: tuple(p) for n, p in self.pinned.items()}

    def to_dict(self) -> dict:
        return {
            "format": CACHE_FORMAT, "version": CACHE_VERSION,
            "layers": self.layers, "options": [list(o) for o in self.options],
            "delta": self.delta.tolist(), "reference_loss": self.reference_loss, "loss": self.loss,
            "reference": list(self.reference), "pinned": {n: list(p) for n, p in self.pinned.items()},
            "samples": self.samples, "fingerprint": self.fingerprint, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Sensitivity":
        return cls(
            layers=list(data["layers"]), options=[tuple(o) for o in data["options"]], delta=np.array(data["delta"]),
            reference_loss=float(data["reference_loss"]), loss=data["loss"], reference=tuple(data["reference"]),
            pinned={n: tuple(p) for n, p in data["pinned"].items()}, samples=int(data["samples"]),
            fingerprint=dict(data["fingerprint"]), seconds=float(data.get("seconds", 0.0)),
        )

    @property
    def insensitive(self) -> list[str]:
        """Layers whose ΔL is zero at every option: the loss on the calibration data does not depend on them
        (a dead or untrained branch, an output that ignores them). Flagged, never taken as free by the
        allocators (:func:`anybit.mixed.allocate` keeps them at their highest option)."""
        return [n for n, row in zip(self.layers, self.delta) if np.all(np.abs(row) <= ZERO_DELTA)]

    def table(self) -> list[list]:
        """Rows ``[layer, ΔL at each option...]`` for printing."""
        return [[name, *(f"{v:.4g}" for v in row)] for name, row in zip(self.layers, self.delta)]

    def headers(self) -> list[str]:
        return ["layer", *(f"ΔL@{option_label(o)}" for o in self.options)]


def _setup_key(layer_setup: LayerSetup | None) -> str | None:
    if layer_setup is None:
        return None
    key = getattr(layer_setup, "cache_key", None)
    if key:
        return str(key)
    target = getattr(layer_setup, "__func__", layer_setup)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(layer_setup).__qualname__)}"


def _read_cache(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        warnings.warn(f"sensitivity cache {path} is unreadable ({e}); measuring again", stacklevel=3)
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        warnings.warn(f"{path} is not an anybit sensitivity cache (version {CACHE_VERSION}); measuring again",
                      stacklevel=3)
        return None
    return data


def _stale_reason(cached: dict, fingerprint: dict[str, str]) -> str | None:
    """What changed since the cache was written (``None``: nothing)."""
    old = cached.get("fingerprint", {})
    names = {"model": "model weights", "data": "calibration data",
             "settings": "settings (options, loss, reference, layers or set-up)"}
    return ", ".join(label for key, label in names.items() if old.get(key) != fingerprint[key]) or None


def sensitivity(
    model: nn.Module,
    calib_data,
    options: str | Iterable[int | Sequence[int]] = (2, 3, 4, 8),
    *,
    a_bits: int | None = None,
    reference: int = FLOAT_BITS,
    loss: str = "kl",
    layer_setup: LayerSetup | None = None,
    cache_path: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    quiet: bool = False,
) -> Sensitivity:
    """Measure ``ΔL[l, b]`` for every free (not pinned) quantizable layer ``l`` and option ``b``.

    ``options``: bit-widths (``a_bits=None``: activations follow weights; an int: activations fixed
    at that width) or explicit ``(w, a)`` pairs. ``loss``: ``"kl"`` to the float model's outputs, or
    ``"ce"`` with the labels of ``calib_data``. ``layer_setup``: a hook that calibrates a layer for an
    option before it is measured (post-training quantization; see :mod:`anybit.mixed.setup`); without
    it every layer simply runs at the option, as in a multi-bit network. ``cache_path``: a JSON file
    reused when the model weights, the calibration data and the settings are unchanged, and measured
    again (and overwritten) when any of them differ. The model's precision is restored afterwards.
    """
    layers = quant_layers(model)
    if not layers:
        raise MixedPrecisionError("this model has no quantizable layers: call anybit.convert(model) first")
    if any(isinstance(m, SwitchableBatchNorm) for m in model.modules()):
        raise MixedBitsError("a model with switchable BatchNorm runs at one uniform precision only; per-layer bit "
                             "maps need shared BatchNorm (QuantSpec(bn='shared'), the emqnet method)")
    opts = resolve_options(options, a_bits)
    try:
        ref = check_bits(reference, "reference")
    except BitsError as e:
        raise MixedBitsError(str(e)) from None
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = calibration_batches(calib_data, batch_size, device)
    check_loss(loss, batches)
    if check_layers_run(model, take(batches[0][0], slice(0, 1))):      # layers that never run their forward are left float
        layers = quant_layers(model)
    samples = sum(num_samples(x) for x, _ in batches)
    pinned = {n: tuple(m.pinned) for n, m in layers.items() if m.pinned is not None}
    free = [n for n in layers if n not in pinned]
    if not free:
        raise MixedPrecisionError("every quantizable layer is pinned: there is nothing to allocate")

    settings = {"options": [list(o) for o in opts], "reference": ref, "loss": loss, "layers": free,
                "pinned": {n: list(p) for n, p in pinned.items()}, "setup": _setup_key(layer_setup)}
    fingerprint = {
        "model": model_fingerprint(model),
        "data": data_fingerprint(batches),
        "settings": _hash_settings(settings),
    }
    path = Path(cache_path) if cache_path is not None else None
    if path is not None and path.is_file():
        cached = _read_cache(path)
        if cached is not None:
            reason = _stale_reason(cached, fingerprint)
            if reason is None:
                result = Sensitivity.from_dict(cached)
                result.from_cache = True
                return result
            warnings.warn(f"sensitivity cache {path} is stale ({reason} changed); measuring again", stacklevel=2)

    start = time.perf_counter()
    saved = get_precision(model)
    was_training = model.training
    model.eval()
    ref_map = {n: (ref, ref) for n in free} | pinned
    delta = np.zeros((len(free), len(opts)))
    try:
        targets = float_targets(model, batches)
        if layer_setup is not None:
            set_precision(model, ref_map)
            for name, pair in pinned.items():
                if pair != (FLOAT_BITS, FLOAT_BITS):
                    layer_setup(model, name, *pair)
        set_precision(model, ref_map)
        ref_loss = dataset_loss(model, batches, targets, loss)
        if not math.isfinite(ref_loss):
            raise MixedPrecisionError(f"the reference loss is {ref_loss}: the model's outputs are not finite")
        cells = [(i, k) for i in range(len(free)) for k in range(len(opts))]
        for i, k in progress(cells, desc="sensitivity", quiet=quiet):
            name, option = free[i], opts[k]
            if layer_setup is not None:
                layer_setup(model, name, *option)
                set_precision(model, ref_map)
            set_precision(model, {name: option})
            delta[i, k] = dataset_loss(model, batches, targets, loss) - ref_loss
            set_precision(model, {name: ref_map[name]})
    finally:
        set_precision(model, saved)
        model.train(was_training)
    if not np.all(np.isfinite(delta)):
        bad = [f"{free[i]}@{option_label(opts[k])}" for i, k in zip(*np.nonzero(~np.isfinite(delta)))]
        raise MixedPrecisionError(f"the loss is not finite for {bad[:5]}: these options break the model")

    result = Sensitivity(free, opts, delta, ref_loss, loss, (ref, ref), pinned, samples, fingerprint,
                         time.perf_counter() - start)
    if path is not None:
        write_json(path, result.to_dict())
    return result


def _hash_settings(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
