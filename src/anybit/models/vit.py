"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28×28 and 32×32 images.

Patch embedding (a convolution with stride = kernel = ``patch_size``), learned position embeddings, a class
token or mean pooling, ``depth`` pre-norm blocks (LayerNorm → multi-head self-attention → residual,
LayerNorm → MLP with GELU → residual), a final LayerNorm and a linear head. LayerNorm throughout, no
BatchNorm. Every matrix multiplication with a weight is an ``nn.Conv2d`` or ``nn.Linear`` (q/k/v as one
``qkv`` Linear, the output projection, the two MLP layers), so :func:`anybit.convert` quantizes them; the
two attention matmuls (q·kᵀ and probabilities·v) and the softmax input are marked with
:class:`anybit.quant.ActivationPoint`, which convert quantizes when ``QuantSpec(attn_matmul=True)`` /
``attn_softmax=True`` asks for it.

An image side that ``patch_size`` does not divide is zero-padded (after normalisation, i.e. with the
mean pixel) to the next multiple, split evenly between both sides: 28×28 with patch 8 becomes 32×32.
The model is built for one ``image_size``; another input size is an error that says so.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.modules import ActivationPoint
from .errors import ModelConfigError

POOLING = ("cls", "mean")


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches of a square image, each projected to ``dim`` features."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.grid = math.ceil(image_size / patch_size)
        pad = self.grid * patch_size - image_size
        self.padding = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)   # left, right, top, bottom
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this ViT was built for {self.image_size}x{self.image_size} images, got input of shape "
                f"{tuple(x.shape)}: build it with image_size={x.shape[-1] if x.dim() == 4 else '...'} "
                f"(anybit train passes the dataset's image size)"
            )
        if any(self.padding):
            x = F.pad(x, self.padding)
        return self.proj(x).flatten(2).transpose(1, 2)        # (batch, patches, dim)


class Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` projection and an output projection ``proj``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        # inputs of the two attention matmuls, and the softmax input: quantized only if the spec asks
        self.q_in, self.k_in, self.v_in = ActivationPoint("matmul"), ActivationPoint("matmul"), ActivationPoint("matmul")
        self.probs_in = ActivationPoint("probabilities")
        self.softmax_in = ActivationPoint("softmax_input")
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = (self.q_in(q) * self.scale) @ self.k_in(k).transpose(-2, -1)
        probs = self.softmax_in(scores).softmax(dim=-1)
        out = self.probs_in(probs) @ self.v_in(v)               # (batch, heads, tokens, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, round(dim * mlp_ratio)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A ViT classifier for small square images.

    ``embed_dim`` features per token (× ``width``, rounded to a multiple of ``num_heads``), ``depth`` blocks of
    ``num_heads`` heads, MLP hidden size ``mlp_ratio`` × the token width; ``pool="cls"`` classifies the class
    token, ``"mean"`` the mean of the patch tokens.
    """

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3, num_classes: int = 10,
                 embed_dim: int = 128, depth: int = 6, num_heads: int = 4, mlp_ratio: float = 2.0,
                 pool: str = "mean", width: float = 1.0) -> None:
        super().__init__()
        _check(image_size=image_size, patch_size=patch_size, in_channels=in_channels, num_classes=num_classes,
               embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        if not _number(mlp_ratio) or not 0 < mlp_ratio <= MAX_MLP_RATIO:
            raise ModelConfigError(f"mlp_ratio={mlp_ratio!r} must be positive, at most {MAX_MLP_RATIO:g} (the MLP's "
                                   f"hidden size over the token width)")
        if not _number(width) or not width > 0:
            raise ModelConfigError(f"width={width!r} must be positive (a multiplier of embed_dim)")
        if embed_dim * width > MAX_DIM:
            raise ModelConfigError(f"embed_dim={embed_dim} at width={width:g} is {embed_dim * width:g} features per "
                                   f"token: at most {MAX_DIM}")
        if pool not in POOLING:
            raise ModelConfigError(f"pool={pool!r} is unknown: expected one of {', '.join(POOLING)}")
        if patch_size > image_size:
            raise ModelConfigError(f"patch_size={patch_size} is larger than image_size={image_size}")
        dim = max(1, round(embed_dim * width / num_heads)) * num_heads
        self.embed_dim, self.pool = dim, pool
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        tokens = self.patch_embed.num_patches + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):   # as the original ViT: Xavier-uniform (0.02-std normal trains slower here)
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))


# Upper limits, checked before any tensor is allocated (a sidecar or an option asking for more fails with a
# message, not an out-of-memory error).
MAX_DIM = 8192
MAX_MLP_RATIO = 16.0
_LIMITS = {"image_size": 1024, "patch_size": 1024, "in_channels": 64, "num_classes": 100_000, "embed_dim": MAX_DIM,
           "depth": 64, "num_heads": 256}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _LIMITS[name]:
            raise ModelConfigError(f"{name}={value!r} must be a positive integer, at most {_LIMITS[name]}")
