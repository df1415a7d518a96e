"""The multi-bit training step as a small public API, for a plain PyTorch loop or a Lightning module.

``MultiBitTrainer`` is one user of it; your own loop can be another::

    model = anybit.train.prepare_model(torchvision.models.resnet18(num_classes=10), TrainConfig(method="emqnet"))
    step = anybit.train.MultiBitStep(model, bits=(1, 2, 4, 8, 32))
    for images, labels in loader:
        step(images, labels)                   # every bit-width: forward, loss, backward (gradients add up)
        optimizer.step()
        optimizer.zero_grad()
    anybit.train.reestimate_bn(model, loader, step.bits)   # the BatchNorm statistics pass training ends with

In a Lightning module, return ``self.step.loss(batch)`` from ``training_step`` (Lightning runs the
backward pass). A step's batch is ``(images, labels)`` for every bit-width, or ``{bits: (images, labels,
indices)}`` when each bit-width trains on its own samples (bit-wise coreset sampling).

Under ``torchrun``, pass the ``DistributedDataParallel`` wrapper of the model as ``forward_module``: every
bit-width but the last runs inside its ``no_sync()``, so gradients are averaged over the processes once
per step, after all bit-widths have added theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation import logits_of
from ..quant import quant_layers, set_precision
from .config import AMP_CHOICES, AMP_MAX_BITS, TrainConfig, TrainConfigError
from .distill import Distillation, TeacherMemory


@dataclass
class BitResult:
    """What one bit-width's part of a step produced: its loss (detached after the backward pass) and logits."""

    loss: torch.Tensor
    logits: torch.Tensor


class MultiBitStep:
    """One training step at every bit-width of a converted network, highest precision first.

    ``model`` is a converted network (:func:`prepare_model`, or :func:`anybit.convert` with your own spec);
    ``bits`` the trained bit-widths. ``distill``: ``none`` (labels at every bit-width, emqnet's default),
    ``recursive`` (each bit-width learns the next higher one's soft labels) or ``from-top``. When a student's
    batch is not its teacher's, the teacher's logits come from ``memory`` (a :class:`TeacherMemory`, which
    needs the batches' dataset indices); without one, those students learn from their labels.

    ``forward_module``: what runs the forward pass, a module or a function of the bit-width giving one
    (e.g. the ``DistributedDataParallel`` wrapper of ``model``); a module with ``no_sync()`` synchronises
    gradients only in the last bit-width it runs in a step. ``amp="bf16"``: the passes at ``AMP_MAX_BITS``
    (4) bits or fewer run under bf16 autocast; higher bit-widths and float stay in float32 (see
    docs/distributed.md for why).
    """

    def __init__(self, model: nn.Module, bits: Iterable[int], distill: str = "none", label_smoothing: float = 0.0,
                 memory: TeacherMemory | None = None, *,
                 forward_module: nn.Module | Callable[[int], nn.Module] | None = None, amp: str = "off") -> None:
        if not quant_layers(model):
            raise TypeError("MultiBitStep needs a converted model: call anybit.train.prepare_model(model, config) "
                            "or anybit.convert(model, spec) first")
        config = TrainConfig(bits=tuple(bits), distill=distill, label_smoothing=label_smoothing)  # validates
        if amp not in AMP_CHOICES:
            raise TrainConfigError(f"amp={amp!r} is unknown: expected one of {', '.join(AMP_CHOICES)}")
        self.model = model
        # the trainer's BitModels hold one network per bit-width for 'dedicated'
        self._model_for = model.for_bits if hasattr(model, "for_bits") else (lambda bits: model)
        self.bits = config.bits_desc
        self.distill = Distillation(distill, self.bits, label_smoothing)
        self.memory = memory
        self.amp = amp
        if forward_module is None:
            self._runner_for = self._model_for
        elif isinstance(forward_module, nn.Module):
            self._runner_for = lambda bits: forward_module
        else:
            self._runner_for = forward_module
        # a runner's gradients are synchronised in the last bit-width (of the step's order) that uses it
        last: dict[int, int] = {}
        for b in self.bits:
            last[id(self._runner_for(b))] = b
        self._sync_bits = set(last.values())

    def run_bit(self, bits: int, batch: Mapping, logits_at: dict[int, torch.Tensor], backward: bool = True
                ) -> BitResult:
        """Forward at ``bits`` on its batch, its loss, and (``backward``) the backward pass. ``logits_at``
        holds the higher bit-widths' logits of this step (teachers on the same batch); this one's are added."""
        model = self._model_for(bits)
        set_precision(model, bits)
        images, labels, *rest = batch[bits]
        runner = self._runner_for(bits)
        no_sync = backward and bits not in self._sync_bits and hasattr(runner, "no_sync")
        with runner.no_sync() if no_sync else nullcontext():
            with self.autocast(bits, images.device):
                logits = logits_of(runner(images))
                loss = self.distill.loss(logits, labels, self._teacher(bits, batch, logits_at))
            if backward:
                loss.backward()
                loss = loss.detach()
        logits_at[bits] = logits.detach().float()
        if self.memory is not None and rest:
            self.memory.store(bits, rest[0], logits_at[bits])
        return BitResult(loss, logits_at[bits])

    def autocast(self, bits: int, device: torch.device):
        """bf16 autocast for a pass at ``bits`` when ``amp="bf16"`` and ``bits <= AMP_MAX_BITS``, else nothing."""
        if self.amp == "bf16" and bits <= AMP_MAX_BITS:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, images_or_batch, labels: torch.Tensor | None = None, backward: bool = True
                 ) -> dict[int, BitResult]:
        """Every bit-width's part of one step; gradients of all of them accumulate (no optimizer step)."""
        batch = self.per_bit_batch(images_or_batch, labels)
        logits_at: dict[int, torch.Tensor] = {}
        return {b: self.run_bit(b, batch, logits_at, backward) for b in self.bits}

    def loss(self, images_or_batch, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The sum of every bit-width's loss, graphs kept, for a framework that runs the backward pass itself.
        (Calling the step directly frees each bit-width's graph as it goes and needs less memory.)"""
        return sum(r.loss for r in self(images_or_batch, labels, backward=False).values())

    def per_bit_batch(self, images_or_batch, labels: torch.Tensor | None = None) -> dict:
        """``{bits: (images, labels[, indices])}`` from ``(images, labels)``, a pair, or such a dict."""
        if isinstance(images_or_batch, Mapping):
            missing = [b for b in self.bits if b not in images_or_batch]
            if missing:
                raise ValueError(f"the step's batch has no entry for bit-widths {missing}: give one per trained "
                                 f"bit-width {self.bits}")
            return images_or_batch
        if labels is None:
            images_or_batch, labels = images_or_batch[:2]
        pair = (images_or_batch, labels)
        return dict.fromkeys(self.bits, pair)

    def _teacher(self, bits: int, batch: Mapping, logits_at: dict):
        t = self.distill.teacher(bits)
        if t is None:
            return None
        if batch[t] is batch[bits]:
            return logits_at[t]
        indices = batch[bits][2] if len(batch[bits]) > 2 else None
        if self.memory is None or indices is None:
            return None
        return self.memory.read(t, indices)


def prepare_model(model: nn.Module, config: TrainConfig | None = None) -> nn.Module:
    """``model`` (any float ``nn.Module``) converted the way ``config.method`` trains it, in place; for your own
    loop with :class:`MultiBitStep`. ``dedicated`` trains one model per bit-width: convert a copy per
    bit-width yourself, or use :class:`~anybit.train.MultiBitTrainer`."""
    from .methods import METHODS, build_models

    config = (config or TrainConfig()).resolved()
    if not METHODS[config.method].shared:
        raise ValueError("method 'dedicated' trains one model per bit-width; prepare_model returns one shared "
                         "network (method 'emqnet' or 'anyprecision')")
    return build_models(model, config)["all"]
