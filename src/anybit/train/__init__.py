"""Multi-bit training: one network for every bit-width (dedicated, Any-Precision, EMQNet).

``MultiBitTrainer(model, train_set, test_set, TrainConfig(method="emqnet")).fit()`` trains;
``recalibrate_bn`` gives a switchable-BN model statistics for a bit-width it was not trained at;
``reestimate_bn`` is the BatchNorm statistics pass the trainer ends with. ``MultiBitStep`` (with
``prepare_model``) is the training step for your own loop.
"""

from .bn import NoSwitchableBNError, bn_bits, recalibrate_bn, reestimate_bn, shared_bn_recalibrated
from .config import CORESET_SCORES, DISTILL_CHOICES, METHOD_NAMES, DivergenceError, TrainConfig, TrainConfigError
from .distill import Distillation, TeacherMemory, soft_cross_entropy
from .methods import METHODS, BitModels, Method, build_models, nearest_bits
from .sampling import CoresetOptions, EpochSampler, FullDataSampler, make_sampler
from .state import ResumeError
from .step import BitResult, MultiBitStep, prepare_model
from .trainer import MultiBitTrainer, check_same_config

__all__ = [
    "BitModels", "BitResult", "CORESET_SCORES", "CoresetOptions", "DISTILL_CHOICES", "Distillation", "DivergenceError",
    "EpochSampler", "MultiBitStep", "TeacherMemory", "prepare_model",
    "FullDataSampler", "METHODS", "METHOD_NAMES", "Method", "MultiBitTrainer", "NoSwitchableBNError",
    "ResumeError", "TrainConfig", "TrainConfigError", "bn_bits", "build_models", "check_same_config",
    "make_sampler", "nearest_bits", "recalibrate_bn", "reestimate_bn", "shared_bn_recalibrated",
    "soft_cross_entropy",
]
