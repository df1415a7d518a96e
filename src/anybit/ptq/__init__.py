"""Post-training quantization: range initialisation (min/max, MSE), AdaQuant (parallel and
sequential), BatchNorm tuning, bias tuning, and the rtn/mse/adaquant/light/advanced pipelines.

    from anybit import ptq
    qmodel, report = ptq.quantize(float_model, calib_images, w_bits=4, a_bits=4, pipeline="advanced")
"""

from .layerwise import adaquant, capture, layer_errors
from .calibdata import calibration_tensor
from .errors import CacheTooLargeError, CalibrationDataError, PTQError
from .floatcopy import PTQ_SPEC, check_quantizable, float_copy, ptq_convert
from .graph import LayerGraph, PostOp, analyse
from .pipeline import PIPELINES, STAGES, PTQConfig, PTQContext, PTQReport, quantize, resolve_pipeline
from .ranges import act_range, init_ranges, smooth, weight_grid
from .tuning import bias_tuning, bn_tuning, float_logits, logits_kl

__all__ = [
    "CacheTooLargeError", "CalibrationDataError", "LayerGraph", "PIPELINES", "PTQConfig", "PTQContext", "PTQError",
    "PTQReport", "PTQ_SPEC", "PostOp", "STAGES", "act_range", "adaquant", "analyse", "bias_tuning", "bn_tuning",
    "calibration_tensor", "capture", "float_logits", "logits_kl", "check_quantizable", "float_copy", "init_ranges", "layer_errors", "ptq_convert",
    "quantize", "resolve_pipeline", "smooth", "weight_grid",
]
