"""anybit: one PyTorch model, every precision.

Convert any model, set its precision per layer, train it for many bit-widths at once,
calibrate it after training, and allocate bits per layer under a budget.
"""

from . import data, export, mixed, models, ptq, quant, train
from .checkpoint import CheckpointError, load, read_metadata, save
from .quant import (
    BitsError,
    LayerInfo,
    QuantSpec,
    calibrate_activations,
    conversion_report,
    convert,
    get_precision,
    precision,
    quantizable_layers,
    set_precision,
)

__version__ = "0.1.0"

__all__ = [
    "BitsError", "CheckpointError", "LayerInfo", "QuantSpec", "__version__", "calibrate_activations", "conversion_report", "convert",
    "data", "export", "get_precision", "load", "mixed", "models", "ptq", "quant", "train", "precision", "quantizable_layers", "read_metadata", "save", "set_precision",
]
