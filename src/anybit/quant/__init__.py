"""Quantizers, quantizable layers, conversion of any model and precision control."""

from .convert import ConversionReport, NothingToQuantizeError, check_layers_run, conversion_report, convert, float_layer
from .batchnorm import (
    PRECISION_BN_TYPES,
    UNTRAINED_RULES,
    PrecisionBatchNorm1d,
    PrecisionBatchNorm2d,
    PrecisionTrace,
    bn_state,
    quantization_step,
    restore_bn_state,
    stats_key,
)
from .bitlist import parse_bit_list
from .calibrate import calibrate_activations
from .functional import (
    FLOAT_BITS,
    VALID_BITS,
    BitsError,
    apply_wbc,
    check_bits,
    round_ste,
    wbc_terms,
    weight_bias_correction,
)
from .modules import (
    ACTIVATION_ROLES,
    QUANT_LAYER_TYPES,
    ActivationPoint,
    FrozenPrecisionError,
    QuantAct,
    QuantConv2d,
    QuantLinear,
    QuantModule,
    QuantMultiheadAttention,
    PrecisionNotTrainedError,
    SwitchableBatchNorm,
    precision_key,
)
from .precision import (
    LayerInfo,
    NotConvertedError,
    UnknownLayerError,
    get_precision,
    precision,
    quant_layers,
    quantizable_layers,
    set_precision,
)
from .quantizers import ActQuantizer, RangeNotCalibratedError, WeightQuantizer
from .spec import DEFAULT_KEEP_FIRST_LAST, QuantSpec, SpecError

__all__ = [
    "ACTIVATION_ROLES", "ActivationPoint", "QuantAct", "ActQuantizer", "BitsError", "DEFAULT_KEEP_FIRST_LAST", "check_layers_run", "float_layer", "PRECISION_BN_TYPES", "PrecisionBatchNorm1d", "PrecisionBatchNorm2d", "PrecisionTrace",
    "UNTRAINED_RULES", "bn_state", "quantization_step", "restore_bn_state", "stats_key", "PrecisionNotTrainedError", "UnknownLayerError", "calibrate_activations", "ConversionReport", "FLOAT_BITS", "LayerInfo", "NotConvertedError",
    "NothingToQuantizeError", "QUANT_LAYER_TYPES", "QuantConv2d", "QuantLinear", "QuantModule",
    "QuantMultiheadAttention", "QuantSpec", "RangeNotCalibratedError", "SpecError", "SwitchableBatchNorm",
    "VALID_BITS", "WeightQuantizer", "parse_bit_list", "check_bits", "conversion_report", "convert", "get_precision",
    "precision", "precision_key", "quant_layers", "quantizable_layers", "round_ste", "set_precision",
    "weight_bias_correction", "wbc_terms", "apply_wbc", "FrozenPrecisionError",
]
