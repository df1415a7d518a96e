"""Model registry: ``anybit.models.create(name, **kw)`` builds reference architectures by name.

Names: ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56`` (CIFAR-style, ``width``,
``num_classes``, ``in_channels``), ``vit_tiny`` (a small Vision Transformer: ``image_size``, ``patch_size``,
``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``pool``, ``width``, ``num_classes``, ``in_channels``)
and ``torchvision.<name>`` for any torchvision classifier (random init, ``num_classes``). The returned model records its name and arguments in
``model.anybit_meta`` so a checkpoint can rebuild it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from .errors import ModelConfigError, UnknownModelError
from .resnet_cifar import CifarResNet
from .vit import VisionTransformer

__all__ = ["ModelConfigError", "UnknownModelError", "available", "create", "parameters", "register"]


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
    def build(width: float = 1.0, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
        return CifarResNet(depth, width=width, num_classes=num_classes, in_channels=in_channels)

    build.__doc__ = f"CIFAR-style ResNet-{depth} (width multiplier, classes, input channels)."
    return build


def vit_tiny(image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
             embed_dim: int = 128, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 2.0, pool: str = "mean",
             width: float = 1.0) -> nn.Module:
    """A small ViT (:class:`~anybit.models.VisionTransformer`) for 28x28 / 32x32 images, LayerNorm, no BatchNorm."""
    return VisionTransformer(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             mlp_ratio=mlp_ratio, pool=pool, width=width)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {f"resnet{d}": _cifar_resnet(d) for d in (20, 32, 44, 56)}
_REGISTRY["vit_tiny"] = vit_tiny


def register(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add an architecture (a builder taking keyword arguments) under ``name``."""
    _REGISTRY[name] = builder


def available() -> list[str]:
    """Registered names (``torchvision.<name>`` is accepted too)."""
    return sorted(_REGISTRY)


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm

    tv_name = name.split(".", 1)[1]
    if tv_name not in tvm.list_models(module=tvm):
        hint = difflib.get_close_matches(tv_name, tvm.list_models(module=tvm), n=3)
        raise UnknownModelError(
            f"torchvision has no classification model {tv_name!r}" + (f"; close: {hint}" if hint else "")
        )

    def build(num_classes: int = 1000, in_channels: int = 3, **kw) -> nn.Module:
        if in_channels != 3:
            raise ModelConfigError(f"torchvision models take 3 input channels, not {in_channels}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 100_000:
            raise ModelConfigError(f"num_classes={num_classes!r} must be an integer in 1..100000")
        return tvm.get_model(tv_name, weights=None, num_classes=num_classes, **kw)

    return build


def parameters(name: str) -> list[str] | None:
    """Keyword arguments the builder of ``name`` takes (``None`` where it passes any on, as
    ``torchvision.<name>`` does). Raises :class:`UnknownModelError` for a name not registered."""
    if name.startswith("torchvision."):
        return None
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return list(params)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name.startswith("torchvision."):
        return _torchvision_builder(name)
    if name in _REGISTRY:
        return _REGISTRY[name]
    hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    raise UnknownModelError(
        f"unknown model {name!r}: expected one of {available()} or torchvision.<name>"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
    )


def create(name: str, **kwargs) -> nn.Module:
    """Build the model called ``name`` with ``kwargs`` (e.g. ``create("resnet20", width=5)``)."""
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            raise ModelConfigError(f"model {name!r} does not take {bad}: it takes {sorted(params)}")
    model = builder(**kwargs)
    model.anybit_meta = {"arch": name, "arch_kwargs": dict(kwargs)}
    return model
