"""Per-sample importance scores for coreset sampling, computed from a child model's logits.

Every score is "higher = more worth training on". The functions work on plain tensors so they can
be checked by hand; :func:`score_dataset` runs them over a dataset at each bit-width of a
multi-bit model (bit-wise score extraction).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation import logits_of

SCORE_NAMES = ("el2n", "grand", "entropy", "forgetting", "random")


class UnknownScoreError(ValueError):
    """A score name that is not one of :data:`SCORE_NAMES`."""


def check_score_name(score: str) -> str:
    """Return ``score`` if it names a known score, else raise listing the valid names."""
    if score not in SCORE_NAMES:
        raise UnknownScoreError(f"score={score!r} is unknown: expected one of {', '.join(SCORE_NAMES)}")
    return score


def _error_vector(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """softmax(logits) - onehot(labels), the gradient of cross-entropy w.r.t. the logits."""
    probs = torch.softmax(logits.float(), dim=1)
    return probs - F.one_hot(labels.long(), probs.shape[1]).to(probs.dtype)


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N: ``||softmax(logits) - onehot(labels)||_2`` per sample (Paul et al., 2021); in [0, sqrt(2)]."""
    return _error_vector(logits, labels).norm(dim=1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax in nats per sample; in [0, log(num_classes)]."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def grand(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """GraNd restricted to a linear last layer, in closed form.

    For logits ``z = W h + b`` and cross-entropy loss, ``dL/dW = (p - y) h^T`` and ``dL/db = p - y``,
    so the gradient norm is ``||p - y|| * sqrt(||h||^2 + 1)`` (``||p - y|| * ||h||`` without bias).
    ``features`` is ``h``, the last layer's input, shape (N, D).
    """
    err = el2n(logits, labels)
    sq = features.flatten(1).float().pow(2).sum(dim=1)
    return err * (sq + 1.0).sqrt() if bias else err * sq.sqrt()


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Boolean per sample: is the arg-max prediction the label."""
    return logits.argmax(dim=1) == labels


class ForgettingTracker:
    """Forgetting events (Toneva et al., 2019): correct -> incorrect transitions per sample.

    :meth:`update` is called once per scoring pass with each sample's correctness. ``counts`` are the
    events seen so far. :meth:`scores` ranks samples that were never classified correctly above every
    counted one (``max(counts) + 1``), as in the paper, so a single pass (no transition possible yet)
    gives 1 for misclassified and 0 for correctly classified samples.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = int(num_samples)
        self.counts = torch.zeros(self.num_samples, dtype=torch.long)
        self.last_correct = torch.zeros(self.num_samples, dtype=torch.bool)
        self.ever_correct = torch.zeros(self.num_samples, dtype=torch.bool)
        self.seen = torch.zeros(self.num_samples, dtype=torch.bool)
        self.passes = 0

    def update(self, is_correct: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Record the correctness of ``indices`` (all samples when ``None``) in one pass."""
        is_correct = is_correct.detach().to("cpu", torch.bool)
        idx = torch.arange(self.num_samples) if indices is None else indices.detach().to("cpu", torch.long)
        if idx.numel() != is_correct.numel():
            raise ValueError(f"{is_correct.numel()} correctness values for {idx.numel()} indices")
        forgotten = self.seen[idx] & self.last_correct[idx] & ~is_correct
        self.counts[idx] += forgotten.long()
        self.last_correct[idx] = is_correct
        self.ever_correct[idx] |= is_correct
        self.seen[idx] = True
        if indices is None:
            self.passes += 1

    def scores(self) -> torch.Tensor:
        """Forgetting events as float scores; never-learned samples get ``max(counts) + 1``."""
        s = self.counts.float()
        never = ~self.ever_correct
        if bool(never.any()):
            s[never] = float(self.counts.max()) + 1.0
        return s

    def state_dict(self) -> dict:
        return {"counts": self.counts.clone(), "last_correct": self.last_correct.clone(),
                "ever_correct": self.ever_correct.clone(), "seen": self.seen.clone(), "passes": self.passes}

    def load_state_dict(self, state: dict) -> None:
        for key in ("counts", "last_correct", "ever_correct", "seen"):
            value = torch.as_tensor(state[key])
            if value.numel() != self.num_samples:
                raise ValueError(f"forgetting state {key!r} has {value.numel()} entries, expected {self.num_samples}")
            setattr(self, key, value.clone().to(getattr(self, key).dtype))
        self.passes = int(state["passes"])


def last_linear(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` (or ``QuantLinear``) registered in ``model``: its classifier, for GraNd."""
    found = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"score='grand' needs a final nn.Linear classifier, and {type(model).__name__} has none: "
            "use score='el2n' (the default) instead"
        )
    return found[-1]


class _InputCapture:
    """Forward hook keeping the input a linear layer multiplies (activation-quantized when it is)."""

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_hook(self)

    def __call__(self, module, inputs, output) -> None:
        h = inputs[0]
        a_bits = getattr(module, "a_bits", 32)
        if a_bits != 32 and hasattr(module, "input_quant"):
            h = module.input_quant(h, a_bits)
        self.value = h.detach()

    def remove(self) -> None:
        self.handle.remove()


def _batch_scores(score: str, logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None,
                  has_bias: bool) -> torch.Tensor:
    if score == "el2n":
        return el2n(logits, labels)
    if score == "entropy":
        return entropy(logits)
    if score == "grand":
        return grand(logits, labels, features, bias=has_bias)
    return correct(logits, labels).float()  # forgetting: correctness, turned into events by the tracker


@torch.no_grad()
def score_dataset(model: nn.Module, dataset, bits: Sequence[int], score: str, device, batch_size: int = 256,
                  indices: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Scores of every sample of ``dataset`` (or of the samples at ``indices``, in that order) at each
    bit-width in ``bits``, on its un-augmented view.

    One pass over the data; each batch goes through the model once per bit-width under
    ``anybit.precision(model, b)`` in eval mode. Returns ``({bits: scores (N,)}, {bits: seconds})``;
    for ``score="forgetting"`` the values are 0/1 correctness, to be fed to a :class:`ForgettingTracker`.
    The model's training mode, its precision and ``dataset.augment`` are restored afterwards.
    """
    from ..data import make_loader
    from ..quant import precision

    from torch.utils.data import Subset

    check_score_name(score)
    device = torch.device(device)
    source = dataset if indices is None else Subset(dataset, indices.tolist())
    out = {b: torch.empty(len(source), dtype=torch.float32) for b in bits}
    seconds = {b: 0.0 for b in bits}
    capture = None
    has_augment = hasattr(dataset, "augment")
    saved_augment = dataset.augment if has_augment else None
    was_training = model.training
    try:
        if has_augment:
            dataset.augment = False
        if score == "grand":
            layer = last_linear(model)
            capture = _InputCapture(layer)
        model.eval()
        start = 0
        for images, labels in make_loader(source, batch_size, shuffle=False):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            n = labels.shape[0]
            for b in bits:
                t0 = time.perf_counter()
                with precision(model, b):
                    logits = logits_of(model(images))
                feats = capture.value if capture is not None else None
                values = _batch_scores(score, logits, labels, feats,
                                       has_bias=capture is not None and capture.layer.bias is not None)
                out[b][start:start + n] = values.float().cpu()
                seconds[b] += time.perf_counter() - t0
            start += n
        if start != len(source):
            raise ValueError(f"the data loader gave {start} samples for a dataset of length {len(source)}")
    finally:
        if capture is not None:
            capture.remove()
        model.train(was_training)
        if has_augment:
            dataset.augment = saved_augment
    return out, seconds
