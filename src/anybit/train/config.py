"""``TrainConfig``: every setting of a multi-bit training run, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from ..quant import check_bits, parse_bit_list

METHOD_NAMES = ("dedicated", "anyprecision", "emqnet")
DISTILL_CHOICES = ("recursive", "from-top", "none")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
CORESET_SCORES = ("el2n", "grand", "entropy", "forgetting", "random")
BN_STATS = ("shared", "per-precision")
BN_UNTRAINED = ("interpolate", "nearest", "shared")
CORESET_STEPS = ("full", "subset")

# The first/last-layer rule (anybit.quant.DEFAULT_KEEP_FIRST_LAST = 8) has one exception: multi-bit training
# clips every layer's input to a fixed [0, 1], which would destroy the first layer's signed pixels at any integer
# precision, so training keeps the first and last layer in float (Any-Precision's and emqnet's choice).
TRAINING_KEEP_FIRST_LAST = 32

# Method defaults: filled in by TrainConfig.resolved() where a setting was left as None.
_METHOD_DEFAULTS = {
    "dedicated": {"distill": "none", "coreset_fraction": 1.0},
    "anyprecision": {"distill": "recursive", "coreset_fraction": 1.0},
    "emqnet": {"distill": "none", "coreset_fraction": 0.2, "bn_stats": "per-precision", "coreset_steps": "subset"},
}
_OPTIMIZER_DEFAULTS = {"sgd": {"lr": 0.1, "weight_decay": 5e-4}, "adam": {"lr": 1e-3, "weight_decay": 0.0}}


class TrainConfigError(ValueError):
    """An invalid training setting (the message names the setting, the value and what is allowed)."""


class DivergenceError(ValueError):
    """Training stopped at a non-finite loss (NaN or infinity), before the optimizer step that would have spread
    it into the weights; the message names the learning rate (``--lr``) to lower."""

    resumable = False   # a resume with the same settings would diverge again


@dataclass(frozen=True)
class TrainConfig:
    """How :class:`anybit.train.MultiBitTrainer` trains.

    ``None`` means "the default of the method or optimizer": distillation ``recursive`` for
    ``anyprecision`` (``none`` for ``dedicated`` and ``emqnet``), coreset fraction 0.2 for ``emqnet`` and 1
    (off) otherwise, learning rate 0.1 (SGD) or 1e-3 (Adam), weight decay 5e-4 (SGD) or 0 (Adam). See
    :meth:`resolved`. ``coreset_score`` ``random`` (the default) draws each bit-width's subset uniformly,
    disjoint from the others'; ``el2n`` and the other scores weight the draw by a per-bit-width score.

    ``final_bn_batches``: after the last epoch, every BatchNorm's running statistics are re-estimated
    over this many training batches per bit-width (see :func:`anybit.train.reestimate_bn`); 0 keeps
    the statistics training left.

    ``bn_stats`` (emqnet): ``per-precision`` (default: the affine terms shared, running statistics per
    trained bit-width) or ``shared`` (one set for all). ``bn_untrained``: how a per-precision BatchNorm
    derives statistics for an untrained bit-width, without data (``interpolate``, ``nearest``, ``shared``).
    ``coreset_steps`` (coreset sampling): ``subset`` (default: batches of ``batch_size`` per bit-width,
    ``coreset_fraction`` times the steps of a full-data epoch) or ``full`` (as many optimizer steps per
    epoch as a full-data epoch, each bit-width's batch ``coreset_fraction * batch_size`` samples).
    """

    bits: tuple[int, ...] = (1, 2, 4, 8, 32)
    method: str = "emqnet"
    epochs: int = 5
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    schedule: str = "cosine"
    distill: str | None = None
    label_smoothing: float = 0.0
    keep_first_last: int | None = TRAINING_KEEP_FIRST_LAST
    coreset_fraction: float | None = None
    coreset_score: str = "random"
    coreset_refresh: int = 0
    coreset_warmup: int = 1
    coreset_steps: str | None = None
    bn_stats: str | None = None
    bn_untrained: str = "interpolate"
    final_bn_batches: int = 20
    seed: int = 0
    eval_every: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        bits = parse_bit_list(self.bits if isinstance(self.bits, str) else list(self.bits))
        object.__setattr__(self, "bits", tuple(sorted(bits)))
        _choice("method", self.method, METHOD_NAMES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("coreset_score", self.coreset_score, CORESET_SCORES)
        if self.distill is not None:
            _choice("distill", self.distill, DISTILL_CHOICES)
        _choice("bn_untrained", self.bn_untrained, BN_UNTRAINED)
        if self.coreset_steps is not None:
            _choice("coreset_steps", self.coreset_steps, CORESET_STEPS)
        if self.bn_stats is not None:
            _choice("bn_stats", self.bn_stats, BN_STATS)
            if self.method != "emqnet":
                raise TrainConfigError(
                    f"bn_stats={self.bn_stats!r} applies to method 'emqnet' (one BatchNorm whose affine terms every "
                    f"precision shares); {self.method!r} keeps BatchNorm statistics per bit-width already"
                )
        for name in ("epochs", "batch_size"):
            _int_at_least(name, getattr(self, name), 1)
        for name in ("coreset_refresh", "coreset_warmup", "final_bn_batches", "eval_every", "num_workers"):
            _int_at_least(name, getattr(self, name), 0)
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise TrainConfigError(f"lr={self.lr!r} must be a finite positive number")
        if self.weight_decay is not None and not 0 <= self.weight_decay < math.inf:
            raise TrainConfigError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if not 0 <= self.momentum < 1:
            raise TrainConfigError(f"momentum={self.momentum!r} must be in [0, 1)")
        if not 0 <= self.label_smoothing < 1:
            raise TrainConfigError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1)")
        if self.keep_first_last is not None:
            check_bits(self.keep_first_last, "keep_first_last")
        if self.coreset_fraction is not None and not 0 < self.coreset_fraction <= 1:
            raise TrainConfigError(
                f"coreset_fraction={self.coreset_fraction!r} must be in (0, 1]: the share of the training set "
                f"each bit-width sees per epoch (1 = all of it, coreset sampling off)"
            )
        if self.method == "dedicated":
            if self.distill not in (None, "none"):
                raise TrainConfigError(
                    f"distill={self.distill!r} does not apply to method 'dedicated': its models are trained "
                    f"independently (use distill='none', or method 'anyprecision'/'emqnet')"
                )
            if self.coreset_fraction not in (None, 1, 1.0):
                raise TrainConfigError(
                    "coreset sampling (coreset_fraction < 1) needs shared weights: use method 'emqnet' "
                    "(or 'anyprecision'); 'dedicated' is the full-data reference"
                )

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` replaced by the method's or optimizer's default."""
        fill = {k: v for k, v in _METHOD_DEFAULTS[self.method].items() if getattr(self, k, None) is None}
        fill.update({k: v for k, v in _OPTIMIZER_DEFAULTS[self.optimizer].items() if getattr(self, k) is None})
        return replace(self, **fill) if fill else self

    @property
    def bits_desc(self) -> list[int]:
        """Trained bit-widths, highest first (the order of the training step)."""
        return sorted(self.bits, reverse=True)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bits"] = list(self.bits)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"unknown training settings {unknown}: expected some of {sorted(known)}")
        return cls(**data)


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise TrainConfigError(f"{name}={value!r} is unknown: expected one of {', '.join(allowed)}")


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainConfigError(f"{name}={value!r} must be an integer >= {low}")


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """``{key: (saved, current)}`` for every setting that differs (keys in ``ignore`` are skipped)."""
    keys = (set(saved) | set(current)) - set(ignore)
    return {k: (saved.get(k), current.get(k)) for k in sorted(keys) if _norm(saved.get(k)) != _norm(current.get(k))}


def _norm(value):
    if isinstance(value, (list, tuple)):
        return [_norm(v) for v in value]
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value
