"""Reference architectures and the registry that builds them by name."""

from .registry import UnknownModelError, available, create, parameters, register
from .resnet_cifar import BasicBlock, CifarResNet
from .vit import VisionTransformer

__all__ = ["BasicBlock", "CifarResNet", "UnknownModelError", "available", "create", "parameters", "register", "VisionTransformer"]
