"""Reference architectures and the registry that builds them by name."""

from .registry import ModelConfigError, UnknownModelError, available, create, register
from .resnet_cifar import MAX_WIDTH, BasicBlock, CifarResNet

__all__ = ["BasicBlock", "CifarResNet", "MAX_WIDTH", "ModelConfigError", "UnknownModelError", "available", "create", "register"]
