"""Bit-wise coreset sampling (emqnet): each bit-width trains on its own small, informative subset per epoch.

Scores are computed per bit-width with that bit-width's child model (see :mod:`anybit.train.scores`).
Each epoch every bit-width draws ``round(fraction * N)`` samples without replacement with
probability proportional to ``(score / mean score) ** alpha + floor`` (Efraimidis-Spirakis keys via
the Gumbel trick), so informative samples are favoured and every sample keeps a non-zero chance.
Bit-widths draw in turn, preferring samples no other bit-width took this epoch, which makes the
subsets disjoint when ``fraction * len(bits) <= 1`` and spreads the unavoidable overlap evenly otherwise.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import numbers
import time
import warnings
from collections.abc import Mapping, Sequence

import torch

from ..quant import RangeNotCalibratedError
from .scores import SCORE_NAMES, ForgettingTracker, check_score_name, score_dataset

Plan = dict[int, torch.Tensor | None]


class CoresetError(ValueError):
    """An invalid coreset-sampling setting or state."""


def derive_seed(*parts) -> int:
    """A 63-bit seed from a hash of ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sampling_weights(scores: torch.Tensor | None, num_samples: int, alpha: float = 1.0, floor: float = 0.1
                     ) -> torch.Tensor:
    """Unnormalised sampling weights ``(s / mean(s)) ** alpha + floor``; all ones without scores.

    Scores are divided by their mean so that ``floor`` means the same for every score type: with the
    default 0.1, a sample scored 0 is drawn about a tenth as often as an average one (rarely, but not never).
    """
    if scores is None:
        return torch.ones(num_samples)
    s = torch.nan_to_num(scores.detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    mean = float(s.mean())
    if mean <= 0.0:
        return torch.ones(num_samples)
    return (s / mean).pow(alpha) + floor


def overlap(plan: Mapping[int, torch.Tensor | None], num_samples: int | None = None) -> float:
    """Mean pairwise Jaccard index between the bit-widths' subsets of ``plan`` (0: disjoint, 1: identical).

    ``None`` (full data) counts as all ``num_samples`` indices; with fewer than two bit-widths it is 0.
    """
    if any(v is None for v in plan.values()) and num_samples is None:
        if all(v is None for v in plan.values()):
            return 1.0 if len(plan) > 1 else 0.0
        raise CoresetError("a plan entry is None (full data): pass num_samples to overlap()")
    size = num_samples if num_samples is not None else 1 + max(int(v.max()) for v in plan.values() if v.numel())
    masks = []
    for idx in plan.values():
        mask = torch.ones(size, dtype=torch.bool)
        if idx is not None:
            mask = torch.zeros(size, dtype=torch.bool)
            mask[idx] = True
        masks.append(mask)
    pairs = list(itertools.combinations(masks, 2))
    if not pairs:
        return 0.0
    return sum(int((a & b).sum()) / max(1, int((a | b).sum())) for a, b in pairs) / len(pairs)


class BitwiseCoresetSampler:
    """Plans which dataset indices each bit-width trains on, epoch by epoch.

    num_samples: dataset size N.  fraction: subset size per bit-width, in (0, 1]; 1 = full data.
    score: ``el2n`` (default), ``grand``, ``entropy``, ``forgetting`` or ``random``.
    warmup: epochs of uniformly random subsets before the first scoring (at epoch ``warmup``).
    refresh: re-score every ``refresh`` epochs after the first scoring (0: score once).
    seed: subsets are a function of (seed, epoch, bit-width, scores).  rank/world_size: this
    process's shard.  batch_size: scoring batch size.  alpha/floor: sampling weights
    ``(s / mean s) ** alpha + floor``.  shared_subset: one subset for all bit-widths (ablation), drawn
    from the mean of the bit-widths' normalised scores.
    """

    def __init__(
        self,
        num_samples: int,
        fraction: float = 0.2,
        score: str = "random",
        refresh: int = 0,
        warmup: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 256,
        *,
        alpha: float = 1.0,
        floor: float = 0.1,
        shared_subset: bool = False,
    ) -> None:
        self.num_samples = _check_int(num_samples, "num_samples", 1)
        self.fraction = _check_fraction(fraction)
        self.score = check_score_name(score)
        self.refresh = _check_int(refresh, "refresh", 0)
        self.warmup = _check_int(warmup, "warmup", 0)
        self.seed = _check_int(seed, "seed", None)
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise CoresetError(f"rank={rank} must be in [0, world_size) = [0, {self.world_size})")
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        if not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha >= 0):
            raise CoresetError(f"alpha={alpha!r} must be a finite number >= 0 (0: uniform, 1: proportional to score)")
        if not (isinstance(floor, numbers.Real) and math.isfinite(floor) and floor > 0):
            raise CoresetError(f"floor={floor!r} must be a finite number > 0, so that every sample can be drawn")
        self.alpha = float(alpha)
        self.floor = float(floor)
        self.shared_subset = bool(shared_subset)
        self.scores: dict[int, torch.Tensor] = {}
        self.trackers: dict[int, ForgettingTracker] = {}
        self.scored_epochs: list[int] = []

    # ------------------------------------------------------------------ sizes and schedule
    @property
    def subset_size(self) -> int:
        """Samples per bit-width per epoch over all ranks: ``round(fraction * N)``, at least 1."""
        return max(1, min(self.num_samples, round(self.fraction * self.num_samples)))

    @property
    def shard_size(self) -> int:
        """Samples per bit-width per epoch on one rank (the subset padded to a multiple of world_size)."""
        return math.ceil(self.subset_size / self.world_size)

    @property
    def is_full(self) -> bool:
        return self.fraction == 1.0

    def needs_scoring(self, epoch: int) -> bool:
        """True when scores should be (re)computed before planning ``epoch``.

        At ``epoch == warmup``, then every ``refresh`` epochs when ``refresh > 0``; also at any later
        epoch when no scores exist yet (e.g. a run resumed from a sampler state without scores). Never
        with ``fraction == 1`` (full data needs no scores) or ``score="random"`` (nothing to compute).
        """
        if self.is_full or self.score == "random" or epoch < self.warmup:
            return False
        if not self.scores:
            return True
        if epoch == self.warmup:
            return self.warmup not in self.scored_epochs
        return self.refresh > 0 and (epoch - self.warmup) % self.refresh == 0 and epoch not in self.scored_epochs

    # ------------------------------------------------------------------ scoring
    def update_scores(self, model, dataset, bits: Sequence[int], epoch: int, device) -> dict:
        """Score every sample of ``dataset`` at each bit-width (eval mode, no grad, un-augmented view).

        Returns accounting: ``seconds`` (wall time of the whole call), ``samples_scored`` (forward
        passes, N per bit-width; also under ``samples``), ``samples_per_bits`` ({bits: N}), ``per_bits``
        ({bits: {"seconds", "samples"}}: model time per bit-width), ``score`` and ``epoch``. A model whose
        learned activation ranges are not initialised yet (never trained quantized) is not scored: the
        call warns, returns ``skipped`` and :meth:`needs_scoring` asks again the next epoch.
        """
        bits = [int(b) for b in bits]
        if len(dataset) != self.num_samples:
            raise CoresetError(
                f"dataset has {len(dataset)} samples but the sampler was built for num_samples={self.num_samples}"
            )
        start = time.perf_counter()
        if self.score == "random" or self.is_full:
            return self._accounting(start, epoch, bits, {})
        try:
            values, seconds = score_dataset(model, dataset, bits, self.score, device, self.batch_size)
        except RangeNotCalibratedError as err:
            # A model never run at a quantized precision in training mode has no activation ranges yet;
            # its scores would be noise anyway. Skip: with no scores, needs_scoring() asks again next epoch.
            warnings.warn(f"coreset scoring at epoch {epoch} skipped, the model cannot run quantized yet ({err}); "
                          "this epoch samples uniformly and scoring is retried next epoch (set warmup >= 1 "
                          "to score a trained model)", stacklevel=2)
            info = self._accounting(start, epoch, bits, {})
            info["skipped"] = "activation ranges not initialised"
            return info
        for b in bits:
            if self.score == "forgetting":
                tracker = self.trackers.setdefault(b, ForgettingTracker(self.num_samples))
                tracker.update(values[b] > 0.5)
                self.scores[b] = tracker.scores()
            else:
                self.scores[b] = values[b]
        self.scored_epochs.append(int(epoch))
        return self._accounting(start, epoch, bits, seconds)

    def _accounting(self, start: float, epoch: int, bits: list[int], seconds: dict[int, float]) -> dict:
        per = {b: self.num_samples for b in seconds}
        return {
            "seconds": time.perf_counter() - start,
            "samples_scored": sum(per.values()),
            "samples": sum(per.values()),
            "samples_per_bits": per,
            "per_bits": {b: {"seconds": seconds[b], "samples": per[b]} for b in seconds},
            "score": self.score,
            "epoch": int(epoch),
        }

    # ------------------------------------------------------------------ planning
    def weights(self, bits: int, epoch: int) -> torch.Tensor:
        """Sampling weights (all > 0) used for ``bits`` at ``epoch``: uniform during warm-up or without scores."""
        use_scores = epoch >= self.warmup and self.score != "random"
        return sampling_weights(self.scores.get(int(bits)) if use_scores else None, self.num_samples,
                                self.alpha, self.floor)

    def _shared_weights(self, bits: Sequence[int], epoch: int) -> torch.Tensor:
        ws = [self.weights(b, epoch) for b in bits]
        return sum(w / w.mean() for w in ws) / len(ws)

    def plan_epoch(self, epoch: int, bits: Sequence[int]) -> Plan:
        """This rank's dataset indices per bit-width for ``epoch`` (``None`` = full data)."""
        bits = [int(b) for b in bits]
        if len(set(bits)) != len(bits):
            raise CoresetError(f"bits={bits} lists a bit-width twice")
        if self.is_full:
            return {b: None for b in bits}
        full = self._global_plan(int(epoch), bits)
        return {b: self._shard(idx) for b, idx in full.items()}

    def global_plan(self, epoch: int, bits: Sequence[int]) -> Plan:
        """The unsharded plan (every rank's indices together), for inspection and accounting."""
        bits = [int(b) for b in bits]
        return {b: None for b in bits} if self.is_full else self._global_plan(int(epoch), bits)

    def _global_plan(self, epoch: int, bits: list[int]) -> dict[int, torch.Tensor]:
        k, n = self.subset_size, self.num_samples
        if self.shared_subset:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "shared"))
            idx = _draw(self._shared_weights(sorted(bits), epoch), k, torch.zeros(n, dtype=torch.long), g)
            return {b: idx for b in bits}
        # Bit-widths pick in an order that rotates by epoch, so no bit-width always gets first choice.
        order_gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "order"))
        canonical = sorted(bits)  # the plan must not depend on the order the caller lists bit-widths in
        order = [canonical[i] for i in torch.randperm(len(bits), generator=order_gen).tolist()]
        used = torch.zeros(n, dtype=torch.long)
        plan = {}
        for b in order:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, b))
            idx = _draw(self.weights(b, epoch), k, used, g)
            used[idx] += 1
            plan[b] = idx
        return {b: plan[b] for b in bits}

    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return idx
        total = self.shard_size * self.world_size
        if total > idx.numel():  # pad by wrapping around, as torch's DistributedSampler does
            idx = torch.cat([idx, idx[: total - idx.numel()]])
        return idx[self.rank:total:self.world_size]

    def overlap(self, plan: Mapping[int, torch.Tensor | None]) -> float:
        """Mean pairwise Jaccard index of a plan's subsets (see :func:`overlap`)."""
        return overlap(plan, self.num_samples)

    def describe(self) -> dict:
        """What this sampler is, for run.json."""
        return {"sampler": "bitwise-coreset", **self.config(), "subset_size": self.subset_size,
                "shard_size": self.shard_size}

    # ------------------------------------------------------------------ state
    def config(self) -> dict:
        return {"num_samples": self.num_samples, "fraction": self.fraction, "score": self.score,
                "refresh": self.refresh, "warmup": self.warmup, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "batch_size": self.batch_size, "alpha": self.alpha,
                "floor": self.floor, "shared_subset": self.shared_subset}

    def state_dict(self) -> dict:
        """Configuration (JSON-able), scored epochs, and score tensors per bit-width (keys are strings)."""
        return {
            "config": self.config(),
            "scored_epochs": list(self.scored_epochs),
            "scores": {str(b): s.clone() for b, s in self.scores.items()},
            "trackers": {str(b): t.state_dict() for b, t in self.trackers.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore scores and history; the sampling settings must match the ones this sampler was built with."""
        cfg = dict(state.get("config", {}))
        mine = self.config()
        # rank/world_size and batch_size may change on resume; what decides the subsets may not.
        decisive = ("num_samples", "fraction", "score", "seed", "alpha", "floor", "shared_subset", "warmup")
        diff = {k: (cfg[k], mine[k]) for k in decisive if k in cfg and cfg[k] != mine[k]}
        if diff:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CoresetError(f"coreset sampler state does not match this sampler ({listed}); "
                               "build the sampler with the saved settings to resume")
        scores = {}
        for key, value in dict(state.get("scores", {})).items():
            t = torch.as_tensor(value, dtype=torch.float32).clone()
            if t.numel() != self.num_samples:
                raise CoresetError(f"saved scores for {key} bits have {t.numel()} entries, expected {self.num_samples}")
            scores[int(key)] = t
        trackers = {}
        for key, value in dict(state.get("trackers", {})).items():
            tracker = ForgettingTracker(self.num_samples)
            tracker.load_state_dict(value)
            trackers[int(key)] = tracker
        self.scores, self.trackers = scores, trackers
        self.scored_epochs = [int(e) for e in state.get("scored_epochs", [])]


def build_sampler(options, dataset, bits: Sequence[int] | None = None, *, rank: int = 0, world_size: int = 1,
                  batch_size: int = 256) -> BitwiseCoresetSampler:
    """A :class:`BitwiseCoresetSampler` for ``dataset`` from an options object with ``fraction``,
    ``score``, ``refresh``, ``warmup``, ``seed`` (and optionally ``alpha``, ``floor``, ``shared_subset``,
    ``rank``, ``world_size``, ``batch_size``) attributes, e.g. ``anybit.train.sampling.CoresetOptions``."""
    get = lambda name, default: getattr(options, name, default)  # noqa: E731
    return BitwiseCoresetSampler(
        len(dataset), get("fraction", 0.2), get("score", "random"), refresh=get("refresh", 0),
        warmup=get("warmup", 0), seed=get("seed", 0), rank=get("rank", rank),
        world_size=get("world_size", world_size), batch_size=get("batch_size", batch_size),
        alpha=get("alpha", 1.0), floor=get("floor", 0.1), shared_subset=get("shared_subset", False),
    )


def _draw(weights: torch.Tensor, k: int, used: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``k`` indices without replacement, probability proportional to ``weights`` (Gumbel top-k), taking
    the least-used samples first: any sample already used this epoch only when no fresher one is left."""
    u = torch.rand(weights.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    keys = weights.double().log() - (-u.log()).log()
    by_key = torch.argsort(keys, descending=True)
    by_use = torch.sort(used[by_key], stable=True).indices
    chosen = by_key[by_use[:k]]
    # A random order, so rank sharding and in-order loaders see a shuffled subset.
    return chosen[torch.randperm(k, generator=generator)]


def _check_int(value, name: str, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CoresetError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise CoresetError(f"{name}={value} must be >= {minimum}")
    return int(value)


def _check_fraction(fraction) -> float:
    ok = isinstance(fraction, numbers.Real) and not isinstance(fraction, bool)
    if not ok or not (0.0 < float(fraction) <= 1.0):  # also rejects nan
        raise CoresetError(
            f"fraction={fraction!r} is out of range: expected a number in (0, 1], the share of the data each "
            "bit-width trains on per epoch (0.2 = 80% pruning; 1 = full data)"
        )
    return float(fraction)


__all__ = ["SCORE_NAMES", "BitwiseCoresetSampler", "CoresetError", "build_sampler", "derive_seed", "overlap",
           "sampling_weights"]
