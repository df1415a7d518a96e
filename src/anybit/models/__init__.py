"""Reference architectures and the registry that builds them by name; ``anybit.models.hf`` loads
Hugging Face ``transformers`` models from a local directory (``transformers`` imported only then)."""

from . import hf
from .registry import ModelConfigError, UnknownModelError, available, create, register
from .resnet_cifar import MAX_WIDTH, BasicBlock, CifarResNet

__all__ = ["hf", "BasicBlock", "CifarResNet", "MAX_WIDTH", "ModelConfigError", "UnknownModelError", "available", "create", "register"]
