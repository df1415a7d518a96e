"""Which samples each bit-width trains on in an epoch: the sampler protocol and the full-data sampler.

The trainer asks a sampler, once per epoch, for one index list per bit-width (``None`` = the whole
training set, shuffled by the trainer). Index lists of one epoch all have the same length, so every
bit-width takes its k-th batch at step k. The bit-wise coreset sampler (``anybit.train.coreset``)
implements the same protocol.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class EpochSampler(Protocol):
    """What the trainer needs from a data sampler."""

    def plan_epoch(self, epoch: int, bits: list[int]) -> dict[int, torch.Tensor | None]:
        """Per bit-width: dataset indices for this epoch (None = full data, shuffled by the trainer)."""

    def needs_scoring(self, epoch: int) -> bool:
        """Whether :meth:`update_scores` must run before :meth:`plan_epoch` this epoch."""

    def update_scores(self, model, dataset, bits: list[int], epoch: int, device) -> dict:
        """Score the training samples (per bit-width); returns accounting info (``seconds``, ``samples``, ...)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FullDataSampler:
    """Every bit-width sees the whole training set every epoch (the trainer shuffles it)."""

    def plan_epoch(self, epoch: int, bits: list[int]) -> dict[int, torch.Tensor | None]:
        return {b: None for b in bits}

    def needs_scoring(self, epoch: int) -> bool:
        return False

    def update_scores(self, model, dataset, bits, epoch, device) -> dict:
        return {"seconds": 0.0, "samples": 0}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return {"sampler": "full"}


@dataclass(frozen=True)
class CoresetOptions:
    """Settings passed to the bit-wise coreset sampler (see ``anybit train --coreset-*``)."""

    fraction: float = 0.2
    score: str = "random"
    refresh: int = 0
    warmup: int = 0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def make_sampler(options: CoresetOptions, dataset, bits: list[int]) -> EpochSampler:
    """The sampler for these options: full data when ``fraction`` is 1, else the bit-wise coreset
    sampler of ``anybit.train.coreset`` (full data, with a warning, where that module is missing)."""
    if options.fraction >= 1:
        return FullDataSampler()
    try:
        from . import coreset
    except ImportError:
        warnings.warn("anybit.train.coreset is not available: training on the full data instead of a "
                      f"{options.fraction:g} coreset", stacklevel=2)
        return FullDataSampler()
    return coreset.build_sampler(options, dataset, bits)


def describe(sampler: EpochSampler) -> dict:
    """What a sampler is, for run.json."""
    if hasattr(sampler, "describe"):
        return sampler.describe()
    return {"sampler": type(sampler).__name__}


def plan_overlap(plan: dict[int, torch.Tensor | None], num_samples: int) -> dict[str, float]:
    """Jaccard overlap of the subsets of every pair of bit-widths (1.0 where both see all the data)."""
    members: dict[int, torch.Tensor] = {}
    for b, idx in plan.items():
        mask = torch.ones(num_samples, dtype=torch.bool)
        if idx is not None:
            mask = torch.zeros(num_samples, dtype=torch.bool)
            mask[idx] = True
        members[b] = mask
    overlap = {}
    for a, b in itertools.combinations(sorted(plan, reverse=True), 2):
        inter = (members[a] & members[b]).sum().item()
        union = (members[a] | members[b]).sum().item()
        overlap[f"{a}-{b}"] = inter / union if union else 1.0
    return overlap


def checked_plan(plan: dict[int, Any], bits: list[int], num_samples: int) -> dict[int, torch.Tensor | None]:
    """Validate a sampler's plan: one entry per bit-width, index lists of equal length inside the dataset."""
    if set(plan) != set(bits):
        raise ValueError(f"the sampler planned bit-widths {sorted(plan)} but {sorted(bits)} are trained")
    lengths = set()
    out: dict[int, torch.Tensor | None] = {}
    for b in bits:
        idx = plan[b]
        if idx is not None:
            idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
            if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= num_samples:
                raise ValueError(f"the sampler's indices for {b} bits are empty or outside 0..{num_samples - 1}")
        lengths.add(num_samples if idx is None else idx.numel())
        out[b] = idx
    if len(lengths) != 1:
        raise ValueError(f"the sampler planned subsets of different sizes {sorted(lengths)}: every bit-width "
                         f"must get the same number of samples per epoch")
    return out
