"""Distillation between bit-widths: who teaches whom, where the teacher's logits come from, and the loss."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against the teacher's softmax (the teacher gets no gradient)."""
    return _soft_cross_entropy(logits, teacher_logits).mean()


def _soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    target = F.softmax(teacher_logits.detach().float(), dim=1)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


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

    @property
    def teacher_bits(self) -> list[int]:
        """Every bit-width that teaches another one."""
        return sorted({t for t in self.teachers.values() if t is not None}, reverse=True)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Cross-entropy against the labels without a teacher; against the teacher's softmax with one.
        ``teacher`` may be ``(logits, known)``: samples the teacher has no logits for (``known`` False)
        learn from their labels instead."""
        if teacher is None:
            return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        if isinstance(teacher, torch.Tensor):
            return soft_cross_entropy(logits, teacher)
        teacher_logits, known = teacher
        if bool(known.all()):
            return soft_cross_entropy(logits, teacher_logits)
        hard = F.cross_entropy(logits, labels, reduction="none")
        return torch.where(known, _soft_cross_entropy(logits, teacher_logits), hard).mean()


class TeacherMemory:
    """Every teacher bit-width's most recent logits on each training sample, from its own training forwards.

    With bit-wise coreset sampling a student's batch is not its teacher's, so the teacher's logits on it are
    not at hand. Running the teacher on the student's batch would cost an extra forward on data the teacher
    did not train on in that step; the memory instead keeps what the teacher computed the last time it
    trained on each sample (an earlier step or epoch). A sample the teacher has not seen yet has no entry.
    Logits are stored in float16 on the training device: ``len(teachers) × N × classes × 2`` bytes.
    """

    def __init__(self, teachers: Iterable[int], num_samples: int, device: torch.device) -> None:
        self.num_samples, self.device = int(num_samples), torch.device(device)
        self.teachers = sorted(int(t) for t in teachers)
        self.logits: dict[int, torch.Tensor] = {}      # made at the first store, when the class count is known
        self.known = {t: torch.zeros(self.num_samples, dtype=torch.bool, device=self.device) for t in self.teachers}

    @staticmethod
    def size_bytes(teachers: int, num_samples: int, classes: int) -> int:
        return teachers * num_samples * classes * 2

    def store(self, bits: int, indices: torch.Tensor, logits: torch.Tensor) -> None:
        if bits not in self.known:
            return
        if bits not in self.logits:
            self.logits[bits] = torch.zeros(self.num_samples, logits.shape[1], dtype=torch.float16, device=self.device)
        self.logits[bits][indices] = logits.detach().to(torch.float16)
        self.known[bits][indices] = True

    def read(self, bits: int, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(logits, known)`` of teacher ``bits`` on ``indices``; None if it has stored nothing yet."""
        if bits not in self.logits:
            return None
        return self.logits[bits][indices].float(), self.known[bits][indices]

    def state_dict(self) -> dict:
        return {"logits": {str(b): t for b, t in self.logits.items()},
                "known": {str(b): t for b, t in self.known.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.logits = {int(b): torch.as_tensor(t).to(self.device, torch.float16) for b, t in state["logits"].items()}
        self.known = {int(b): torch.as_tensor(t).to(self.device, torch.bool) for b, t in state["known"].items()}
