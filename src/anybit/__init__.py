"""anybit: one PyTorch model, every precision.

Convert any model, set its precision per layer, train it for many bit-widths at once,
calibrate it after training, and allocate bits per layer under a budget.

The names below are loaded on first use (``import anybit`` itself imports nothing heavy), so the
command line starts without importing torch before it can handle Ctrl-C and errors.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "data", "evaluation", "export", "mixed", "models", "ptq", "quant", "report", "train")
_EXPORTS = {
    "CheckpointError": "checkpoint", "load": "checkpoint", "read_metadata": "checkpoint", "save": "checkpoint",
    "BitsError": "quant", "LayerInfo": "quant", "QuantSpec": "quant", "calibrate_activations": "quant",
    "conversion_report": "quant", "convert": "quant", "get_precision": "quant", "precision": "quant",
    "quantizable_layers": "quant", "set_precision": "quant",
}

__all__ = [
    "BitsError", "CheckpointError", "LayerInfo", "QuantSpec", "__version__", "calibrate_activations",
    "conversion_report", "convert", "data", "export", "get_precision", "load", "mixed", "models", "ptq", "quant", "train",
    "precision", "quantizable_layers", "read_metadata", "save", "set_precision",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'anybit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBMODULES) | set(_EXPORTS))
