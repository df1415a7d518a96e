"""Reference architectures and the registry that builds them by name; ``anybit.models.hf`` loads
Hugging Face ``transformers`` models from a local directory (``transformers`` imported only then)."""

from . import hf
from .registry import ModelConfigError, UnknownModelError, available, create, parameters, register
from .resnet_cifar import MAX_WIDTH, BasicBlock, CifarResNet
from .vit import VisionTransformer

__all__ = ["hf", "BasicBlock", "CifarResNet", "MAX_WIDTH", "ModelConfigError", "UnknownModelError", "VisionTransformer",
           "available", "create", "parameters", "register"]
