"""Optimizer and learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or Adam over the trainable parameters.

    Weight decay applies to weight matrices and kernels only (``ndim >= 2``): decaying BatchNorm
    affine terms, biases or learned activation ranges towards zero would only hurt.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.Adam(groups, lr=config.lr)


class LRSchedule:
    """Learning rate as a function of training progress in epochs (fractional), applied every step.

    ``cosine``: from the base rate to zero over all epochs; ``step``: ÷10 at 1/2 and again at 3/4 of
    the epochs; ``none``: constant. It keeps no state beyond the base rates, which live in the
    optimizer's parameter groups (``initial_lr``) and are saved with it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, epochs: int) -> None:
        self.optimizer, self.kind, self.epochs = optimizer, kind, epochs
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def factor(self, progress: float) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress / self.epochs, 1.0)))
        if self.kind == "step":
            return 0.1 ** ((progress >= 0.5 * self.epochs) + (progress >= 0.75 * self.epochs))
        return 1.0

    def apply(self, progress: float) -> float:
        """Set every group's rate for ``progress`` epochs done; returns the factor."""
        f = self.factor(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        return f

    def state_dict(self) -> dict:
        return {"kind": self.kind, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.kind, self.epochs = state["kind"], state["epochs"]
