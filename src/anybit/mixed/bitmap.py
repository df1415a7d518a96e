"""Bit maps on disk (``bitmap.json``: layer name → ``{"w": bits, "a": bits}``) and applying them."""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..checkpoint import write_json
from ..quant import FLOAT_BITS, BitsError, check_bits, get_precision, quant_layers, set_precision
from .errors import BitMapError, BitMapNotFoundError
from .options import Option
from .setup import LayerSetup
from .solver import Allocation


def _as_map(bit_map: Allocation | Mapping) -> dict[str, Option]:
    return dict(bit_map.bit_map) if isinstance(bit_map, Allocation) else dict(bit_map)


def bit_map_to_json(bit_map: Allocation | Mapping) -> dict[str, dict[str, int]]:
    """``{name: {"w": w_bits, "a": a_bits}}`` from an Allocation or a ``{name: (w, a)}`` map."""
    return {name: {"w": int(w), "a": int(a)} for name, (w, a) in _parse_entries(_as_map(bit_map), "bit map").items()}


def save_bit_map(path: str | os.PathLike, bit_map: Allocation | Mapping) -> Path:
    """Write ``bitmap.json`` (atomically); :func:`load_bit_map` reads it back."""
    path = Path(path)
    write_json(path, bit_map_to_json(bit_map))
    return path


def _parse_entries(raw: Mapping, where: str) -> dict[str, Option]:
    out: dict[str, Option] = {}
    for name, value in raw.items():
        try:
            if isinstance(value, Mapping):
                extra = set(value) - {"w", "a"}
                if extra or "w" not in value or "a" not in value:
                    raise BitsError(f"expected {{\"w\": bits, \"a\": bits}}, got keys {sorted(value)}")
                pair = (check_bits(value["w"], "w"), check_bits(value["a"], "a"))
            elif isinstance(value, (list, tuple)) and len(value) == 2:
                pair = (check_bits(value[0], "w"), check_bits(value[1], "a"))
            elif isinstance(value, int) and not isinstance(value, bool):
                b = check_bits(value, "bits")
                pair = (b, b)
            else:
                raise BitsError(f"expected {{\"w\": bits, \"a\": bits}}, got {value!r}")
        except BitsError as e:
            raise BitMapError(f"{where}: entry {name!r} is not a precision: {e}") from None
        out[str(name)] = pair
    return out


def load_bit_map(path: str | os.PathLike, model: nn.Module | None = None, *, allow_partial: bool = False) -> dict[str, Option]:
    """Read a bit map written by :func:`save_bit_map` (or ``anybit mixed``) as ``{name: (w, a)}``.

    With ``model`` the names are checked against its quantizable layers: unknown names are an error
    (with the closest name suggested), and so are layers the map leaves out unless ``allow_partial``.
    Use it with ``anybit.set_precision(model, bit_map)``.
    """
    path = Path(path)
    if not path.is_file():
        raise BitMapNotFoundError(f"no bit map at {path} (expected a bitmap.json written by anybit mixed)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BitMapError(f"{path} is not valid JSON ({e})") from e
    if isinstance(raw, dict) and isinstance(raw.get("bit_map"), dict):  # a run.json-style record
        raw = raw["bit_map"]
    if not isinstance(raw, dict) or not raw:
        raise BitMapError(f"{path} is not a bit map: expected a JSON object {{layer name: {{\"w\": bits, \"a\": bits}}}}")
    bit_map = _parse_entries(raw, str(path))
    if model is not None:
        layers = quant_layers(model)
        if not layers:
            raise BitMapError("this model has no quantizable layers: convert it (anybit.convert) or load an "
                              "anybit checkpoint before applying a bit map")
        unknown = [n for n in bit_map if n not in layers]
        if unknown:
            hints = {n: difflib.get_close_matches(n, list(layers), n=1) for n in unknown[:5]}
            listed = ", ".join(f"{n!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for n, h in hints.items())
            raise BitMapError(f"{path} names layers this model does not have: {listed}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                              + "; was the bit map made for another model?")
        missing = [n for n in layers if n not in bit_map]
        if missing and not allow_partial:
            raise BitMapError(f"{path} leaves out {len(missing)} quantizable layers of this model (e.g. "
                              f"{missing[:3]}); a bit map from anybit mixed covers every layer")
    return bit_map


def prepare(model: nn.Module, bit_map: Allocation | Mapping, layer_setup: LayerSetup | None) -> None:
    """Run ``layer_setup`` for every layer at its precision in ``bit_map`` (float layers skipped), so a
    post-training-quantized model is calibrated for this allocation. Each call sees the other layers
    in float (pinned ones at their pins); the model's precision is restored afterwards."""
    if layer_setup is None:
        return
    saved = get_precision(model)
    layers = quant_layers(model)
    reference = {n: (tuple(m.pinned) if m.pinned is not None else (FLOAT_BITS, FLOAT_BITS)) for n, m in layers.items()}
    try:
        for name, (w, a) in _as_map(bit_map).items():
            if (w, a) != (FLOAT_BITS, FLOAT_BITS):
                set_precision(model, reference)
                layer_setup(model, name, w, a)
    finally:
        set_precision(model, saved)


def apply_allocation(model: nn.Module, bit_map: Allocation | Mapping, layer_setup: LayerSetup | None = None) -> nn.Module:
    """Calibrate (with ``layer_setup``, if given) and set the precision of every layer in ``bit_map``."""
    prepare(model, bit_map, layer_setup)
    return set_precision(model, _as_map(bit_map))
