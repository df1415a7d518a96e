"""Distillation between bit-widths: who teaches whom, and the loss a student learns from."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against the teacher's softmax (the teacher gets no gradient)."""
    target = F.softmax(teacher_logits.detach(), dim=1)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class Distillation:
    """Teacher assignment over the trained bit-widths.

    ``recursive``: each bit-width learns from the next higher one (Any-Precision DNN);
    ``from-top``: every lower bit-width learns from the highest; ``none``: plain cross-entropy.
    The highest bit-width always learns from the labels.
    """

    def __init__(self, kind: str, bits: list[int] | tuple[int, ...], label_smoothing: float = 0.0) -> None:
        self.kind = kind
        self.label_smoothing = label_smoothing
        order = sorted(bits, reverse=True)
        self.teachers: dict[int, int | None] = {order[0]: None}
        for higher, b in zip(order, order[1:]):
            self.teachers[b] = None if kind == "none" else (higher if kind == "recursive" else order[0])

    def teacher(self, bits: int) -> int | None:
        """The bit-width that teaches ``bits``, or None when it learns from the labels."""
        return self.teachers[bits]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None) -> torch.Tensor:
        if teacher_logits is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return soft_cross_entropy(logits, teacher_logits)
