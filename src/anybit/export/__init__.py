"""Export a chosen precision to something that runs: packed integer weights (safetensors + JSON sidecar,
one precision or every precision in one package) and ONNX with QuantizeLinear/DequantizeLinear nodes for
ONNX Runtime's integer kernels.

    anybit.export(model, "out/w4", bits=4, example_input=x)                 # packed
    anybit.export(model, "out/all", bits=range(1, 9), example_input=x)      # every precision, one file
    anybit.export(model, "out/onnx", bits=8, format="onnx", example_input=x, calib_data=images)
    model = anybit.load("out/all", bits=3)
    session = anybit.export.onnx_session("out/onnx"); logits = session(images)

``anybit.export`` is this module and is callable: ``anybit.export(...)`` is :func:`export`.
"""

import sys
import types

from .api import FORMATS, check_runs, export
from .bitpack import pack_codes, packed_nbytes, unpack_codes
from .codes import WeightCodes, weight_codes
from .errors import ExportError, ExportFileError
from .onnx_qdq import OnnxSession, onnx_session, read_onnx_sidecar, with_onnx_weights
from .packed import load_packed, read_packed

__all__ = [
    "ExportError", "ExportFileError", "FORMATS", "OnnxSession", "WeightCodes", "check_runs", "export", "load_packed",
    "onnx_session", "pack_codes", "packed_nbytes", "read_onnx_sidecar", "read_packed", "unpack_codes", "weight_codes", "with_onnx_weights",
]


class _CallableModule(types.ModuleType):
    """``anybit.export`` is both this module and its :func:`export` function."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
