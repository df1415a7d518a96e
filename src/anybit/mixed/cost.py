"""Cost model: what each layer costs at each option, from the model itself.

``size``: weight bits, ``params × w_bits``. ``bops``: bit operations, ``MACs × w_bits × a_bits``
(MACs per sample, measured on an example input). Pinned (first/last) layers keep their pinned
precision: their cost is fixed and counted in every allocation. The float reference, against which
relative budgets are given, is every quantizable layer at 32 bits (weights and activations).
Only the weights of quantizable layers count toward ``size`` (biases and BatchNorm stay float and
are the same in every allocation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..quant import FLOAT_BITS, quantizable_layers
from .errors import MixedPrecisionError
from .options import Option, resolve_options

METRICS = ("size", "bops")


def _unit_cost(metric: str, params: int, macs: int | None, option: Option) -> int:
    w, a = option
    if metric == "size":
        return int(params) * int(w)
    return int(macs) * int(w) * int(a)


@dataclass
class CostModel:
    """Cost of every free layer (rows) at every option (columns), the pinned layers' fixed cost and
    the float model's cost (the denominator of relative budgets)."""

    metric: str
    layers: list[str]
    options: list[Option]
    cost: np.ndarray
    fixed: int
    float_cost: int
    pinned: dict[str, Option] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    macs: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cost = np.asarray(self.cost, dtype=np.int64).reshape(len(self.layers), len(self.options))
        self.options = [tuple(o) for o in self.options]

    @property
    def unit(self) -> str:
        return "bits" if self.metric == "size" else "BOPs"

    def total(self, choice: Sequence[int]) -> int:
        """Exact cost (pinned layers included) of choosing option ``choice[l]`` for layer ``l``."""
        return int(self.fixed + sum(int(self.cost[i, k]) for i, k in enumerate(choice)))

    def relative(self, absolute: float) -> float:
        return float(absolute) / self.float_cost

    def absolute(self, relative: float) -> float:
        return float(relative) * self.float_cost

    def smallest(self) -> int:
        """Least total cost any allocation can have: every free layer at its cheapest option."""
        return int(self.fixed + int(self.cost.min(axis=1).sum()))

    def largest(self) -> int:
        return int(self.fixed + int(self.cost.max(axis=1).sum()))

    def uniform_cost(self, option: Option) -> int:
        """Cost of running every free layer at ``option`` (pinned layers at their pins)."""
        option = tuple(option)
        if option in self.options:
            return self.total([self.options.index(option)] * len(self.layers))
        return int(self.fixed + sum(_unit_cost(self.metric, self.params[n], self.macs.get(n), option)
                                    for n in self.layers))

    def to_dict(self) -> dict:
        return {"metric": self.metric, "unit": self.unit, "layers": self.layers,
                "options": [list(o) for o in self.options], "cost": self.cost.tolist(), "fixed": self.fixed,
                "float_cost": self.float_cost, "pinned": {n: list(p) for n, p in self.pinned.items()},
                "params": self.params, "macs": self.macs}


def cost_model(
    model: nn.Module,
    options: str | Iterable[int | Sequence[int]] = (2, 3, 4, 8),
    metric: str = "size",
    example_input: torch.Tensor | tuple | None = None,
    *,
    a_bits: int | None = None,
) -> CostModel:
    """Cost of each free layer at each option, from :func:`anybit.quantizable_layers`.

    ``metric="bops"`` needs ``example_input`` (a batch of one or more inputs) to count MACs.
    Options and free layers come out in the same order as :func:`sensitivity` uses.
    """
    if metric not in METRICS:
        raise MixedPrecisionError(f"metric={metric!r} is unknown: expected 'size' (weight bits) or 'bops' (bit operations)")
    if metric == "bops" and example_input is None:
        raise MixedPrecisionError("metric='bops' needs example_input (a batch of inputs) to count multiply-accumulates")
    opts = resolve_options(options, a_bits)
    infos = quantizable_layers(model, example_input)
    free = [i for i in infos if i.pinned is None]
    if not free:
        raise MixedPrecisionError("every quantizable layer is pinned: there is nothing to allocate")
    float_option = (FLOAT_BITS, FLOAT_BITS)
    if metric == "bops":
        missing = [i.name for i in infos if not i.macs]
        if missing:
            raise MixedPrecisionError(f"layers {missing[:5]} did not run on the example input: cannot count their BOPs")
    cost = [[_unit_cost(metric, i.params, i.macs, o) for o in opts] for i in free]
    fixed = sum(_unit_cost(metric, i.params, i.macs, i.pinned) for i in infos if i.pinned is not None)
    float_cost = sum(_unit_cost(metric, i.params, i.macs, float_option) for i in infos)
    return CostModel(metric, [i.name for i in free], opts, cost, int(fixed), int(float_cost),
                     {i.name: tuple(i.pinned) for i in infos if i.pinned is not None},
                     {i.name: i.params for i in infos}, {i.name: i.macs for i in infos})
