"""CIFAR-style ResNets (He et al. 2016, section 4.2) with a width multiplier.

Depth 6n+2: a 3×3 stem, three stages of n basic blocks at 16/32/64 channels (× width), global
average pooling and a linear classifier. Stride-2 stages use a 1×1 convolution shortcut, as in
Any-Precision DNN's ResNet-20 (whose 5× width variant is the paper-scale model).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ModelConfigError

MAX_WIDTH = 16.0          # ResNet-20 at 16x width has about 70 M parameters
MAX_CLASSES = 100_000
MAX_IN_CHANNELS = 64


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_arch(depth, width, num_classes, in_channels) -> None:
    """Raise :class:`ModelConfigError` unless the arguments build a CIFAR ResNet (checked before any tensor
    is allocated, so a huge width fails with a message, not an out-of-memory error)."""
    if not _is_int(depth) or depth < 8 or (depth - 2) % 6:
        raise ModelConfigError(f"depth={depth!r} is not a CIFAR ResNet depth: expected 6n+2 (20, 32, 44, 56, 110)")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) \
            or not 0 < width <= MAX_WIDTH:
        raise ModelConfigError(f"width={width!r} must be a number in (0, {MAX_WIDTH:g}] (1 for ResNet-20, 5 for "
                               f"Any-Precision's wide one)")
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ModelConfigError(f"num_classes={num_classes!r} must be an integer in 1..{MAX_CLASSES}")
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise ModelConfigError(f"in_channels={in_channels!r} must be an integer in 1..{MAX_IN_CHANNELS}")


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        check_arch(depth, width, num_classes, in_channels)
        n = (depth - 2) // 6
        planes = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        layers, in_planes = [], planes[0]
        for stage, p in enumerate(planes):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, p, 2 if (stage > 0 and i == 0) else 1))
                in_planes = p
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
