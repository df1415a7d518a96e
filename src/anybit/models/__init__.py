"""Reference architectures and the registry that builds them by name."""

from .registry import UnknownModelError, available, create, register
from .resnet_cifar import BasicBlock, CifarResNet

__all__ = ["BasicBlock", "CifarResNet", "UnknownModelError", "available", "create", "register"]
