"""Errors of the bit allocator: each says what was wrong, what was expected and what to do."""

from __future__ import annotations

from ..quant.functional import BitsError


class MixedPrecisionError(ValueError):
    """An invalid setting or a mismatch between sensitivity, cost model and model."""


class MixedBitsError(MixedPrecisionError, BitsError):
    """A bad bit-width or precision setting given to the allocator (an option outside 1..16/32, a model that cannot
    run per-layer precisions); a :class:`MixedPrecisionError` and a :class:`~anybit.BitsError`."""


class InfeasibleError(MixedPrecisionError):
    """No allocation satisfies the constraint; the message states the smallest feasible value."""


class InfeasibleBudgetError(InfeasibleError):
    """The cost budget is below what the cheapest option of every layer (plus pinned layers) needs.

    ``smallest_budget`` (absolute: bits or BOPs) and ``smallest_relative_budget`` (fraction of the
    float model's cost) are the least budget that has a solution.
    """

    def __init__(self, message: str, smallest_budget: int, smallest_relative_budget: float) -> None:
        super().__init__(message)
        self.smallest_budget = smallest_budget
        self.smallest_relative_budget = smallest_relative_budget


class InfeasibleLossError(InfeasibleError):
    """``max_loss`` is below the sum of every layer's smallest predicted loss increase."""

    def __init__(self, message: str, smallest_max_loss: float) -> None:
        super().__init__(message)
        self.smallest_max_loss = smallest_max_loss


class BitMapError(MixedPrecisionError):
    """A bit map file that is unreadable or does not fit the model."""


class BitMapNotFoundError(BitMapError, FileNotFoundError):
    """No bit map file at the given path."""
