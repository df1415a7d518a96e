"""``anybit.export(model, out, bits=4, format="packed")``: one entry point for every export format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..quant import (
    FLOAT_BITS,
    BitsError,
    PrecisionNotTrainedError,
    RangeNotCalibratedError,
    check_bits,
    get_precision,
    precision,
    quant_layers,
    set_precision,
)
from .errors import ExportError
from .onnx_qdq import export_onnx
from .packed import MAX_PACKED_BITS, write_packed

FORMATS = ("packed", "onnx")


def _precisions(model: nn.Module, bits, bit_map) -> list:
    if (bits is None) == (bit_map is None):
        raise ExportError("give the precision to export: bits=B (or a list of bit-widths for an every-precision "
                          "package) or bit_map={layer: (w, a)}, not both")
    if bit_map is not None:
        if not isinstance(bit_map, Mapping) or not bit_map:
            raise ExportError("bit_map must be a non-empty {layer name: (w_bits, a_bits)} mapping")
        return [dict(bit_map)]
    listed = [bits] if isinstance(bits, int) and not isinstance(bits, bool) else list(bits)
    try:
        checked = [check_bits(b, "bits") for b in listed]
    except BitsError as e:
        raise ExportError(str(e)) from None
    if not checked:
        raise ExportError("bits is empty: give at least one bit-width")
    if len(set(checked)) != len(checked):
        raise ExportError(f"bits {listed} repeats a bit-width")
    return sorted(checked)


def check_runs(model: nn.Module, precisions: list, example_input: torch.Tensor) -> None:
    """Run ``model`` once at every precision on ``example_input``: a precision the model cannot run (a
    BatchNorm without statistics for it, an uncalibrated activation range, a bit map that does not fit)
    is an :class:`ExportError` before anything is written."""
    for p in precisions:
        label = f"{p} bits" if isinstance(p, int) else "the bit map"
        try:
            with torch.no_grad(), precision(model, p):
                model(example_input)
        except (PrecisionNotTrainedError, RangeNotCalibratedError, BitsError, ValueError) as e:
            if isinstance(e, ExportError):
                raise
            raise ExportError(f"the model cannot run at {label}: {e}") from e


def export(model: nn.Module, out: str | os.PathLike, bits: int | Iterable[int] | None = None,
           bit_map: Mapping | None = None, format: str = "packed", example_input: torch.Tensor | None = None,
           calib_data=None, int4: bool = False, requantize: bool = True, metadata: dict | None = None) -> dict:
    """Export a converted ``model`` into the directory ``out`` and return a summary (sizes, files).

    ``format="packed"``: ``out/model.safetensors`` + ``out/model.json`` with integer codes (1..8 bits);
    ``bits`` as a list (``[1, 2, ..., 8]``, optionally with 32) writes one every-precision package.
    ``format="onnx"``: ``out/model.onnx`` + ``out/model.json``, a QDQ graph for ONNX Runtime's integer
    kernels; ``calib_data`` gives the ranges of its extra output requantizations (default: the example);
    ``requantize=False`` leaves them out (those layers run as float convolutions, exactly the PyTorch model).
    ``example_input`` (a batch) is required: the export is run and checked on it. The model's precision
    is left as it was. Files are written to temporary names and renamed.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is unknown: expected one of {', '.join(FORMATS)}")
    if not isinstance(model, nn.Module) or not quant_layers(model):
        raise ExportError("export needs a converted model (anybit.convert, or a model from anybit.load)")
    if any(layer.frozen_bits is not None for layer in quant_layers(model).values()):
        raise ExportError("this model was loaded from a packed export; export the checkpoint it came from")
    if not isinstance(example_input, torch.Tensor):
        raise ExportError("export needs example_input, a batch of inputs (e.g. torch.randn(1, 3, 32, 32)), to "
                          "trace and check the exported model")
    precisions = _precisions(model, bits, bit_map)
    if format != "onnx" and (int4 or not requantize):
        raise ExportError("int4 and requantize apply to format='onnx'")
    if format == "onnx" and len(precisions) > 1:
        raise ExportError("an ONNX file holds one precision: give one bit-width (or a bit map)")
    for p in precisions:
        if isinstance(p, int) and format == "packed" and MAX_PACKED_BITS < p < FLOAT_BITS:
            raise ExportError(f"packed exports store codes of 1..{MAX_PACKED_BITS} bits (or 32-bit floats), "
                              f"not {p} bits")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example_input = example_input.to(device)
    try:
        check_runs(model, precisions, example_input)
        out = Path(out)
        if format == "packed":
            return {"format": "packed", "files": [str(out / "model.safetensors"), str(out / "model.json")],
                    **write_packed(model, out / "model", precisions, example_input, metadata)}
        saved = get_precision(model)
        try:
            set_precision(model, precisions[0])
            summary = export_onnx(model, out, example_input, calib_data, int4=int4, metadata=metadata,
                                  requantize=requantize)
        finally:
            for name, pair in saved.items():
                quant_layers(model)[name].set_bits(*pair)
        return {"format": "onnx", "files": [str(out / "model.onnx"), str(out / "model.json")], **summary}
    finally:
        model.train(was_training)
