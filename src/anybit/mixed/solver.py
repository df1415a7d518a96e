"""Bit allocation: the integer program (``scipy.optimize.milp``, HiGHS), a greedy baseline and
uniform reference points.

Binary ``x[l, k]`` chooses option ``k`` for free layer ``l``; ``Σ_k x[l, k] = 1``. Objective
``"loss"``: minimise ``Σ ΔL·x`` subject to ``fixed + Σ cost·x ≤ budget``. Objective ``"cost"`` (the
dual): minimise ``Σ cost·x`` subject to ``Σ ΔL·x ≤ max_loss`` (and the budget, if one is given).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import LinearConstraint, milp
from scipy.sparse import csr_matrix

from .cost import CostModel
from .errors import InfeasibleBudgetError, InfeasibleLossError, MixedPrecisionError
from .options import Option, option_label
from .sensitivity import Sensitivity

OBJECTIVES = ("loss", "cost")


@dataclass
class Allocation:
    """A bit-width per layer and what it is predicted to cost and lose.

    ``bit_map`` holds every quantizable layer, pinned ones at their pins, ready for
    ``anybit.set_precision(model, allocation.bit_map)``. ``predicted_loss`` is ``Σ ΔL`` of the
    choices (additive model of the sensitivities), ``cost`` the exact total in ``unit``.
    ``measured_loss`` (the loss with every layer at its choice, on the calibration data) and
    ``ranking`` (the candidates it was picked from) are set by :func:`anybit.mixed.pick_measured`.
    """

    bit_map: dict[str, Option]
    predicted_loss: float
    cost: int
    relative_cost: float
    metric: str
    unit: str
    method: str
    objective: str = "loss"
    budget: float | None = None
    relative_budget: float | None = None
    max_loss: float | None = None
    seconds: float = 0.0
    choices: dict[str, Option] = field(default_factory=dict)
    measured_loss: float | None = None
    ranking: list[dict] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many free layers run at each option, e.g. ``{"2": 3, "4": 10, "8": 5}``."""
        out: dict[str, int] = {}
        for option in sorted(set(self.choices.values())):
            out[option_label(option)] = sum(1 for o in self.choices.values() if o == option)
        return out

    def bit_map_json(self) -> dict[str, dict[str, int]]:
        return {name: {"w": w, "a": a} for name, (w, a) in self.bit_map.items()}

    def to_dict(self) -> dict:
        return {
            "method": self.method, "objective": self.objective, "metric": self.metric, "unit": self.unit,
            "budget": self.budget, "relative_budget": self.relative_budget, "max_loss": self.max_loss,
            "cost": self.cost, "relative_cost": self.relative_cost, "predicted_loss": self.predicted_loss,
            "seconds": self.seconds, "counts": self.counts(), "measured_loss": self.measured_loss,
            "ranking": self.ranking, "bit_map": self.bit_map_json(),
        }


def _check_pair(sens: Sensitivity, cost: CostModel) -> None:
    if sens.layers != cost.layers:
        only_s = sorted(set(sens.layers) - set(cost.layers))[:3]
        only_c = sorted(set(cost.layers) - set(sens.layers))[:3]
        raise MixedPrecisionError(
            "the sensitivity and the cost model describe different layers "
            f"(only in sensitivity: {only_s}, only in cost: {only_c}); build both from the same model"
        )
    if list(sens.options) != list(cost.options):
        raise MixedPrecisionError(
            f"the sensitivity options {sens.options} differ from the cost model's {cost.options}; "
            f"build both with the same options and a_bits"
        )
    if sens.pinned != cost.pinned:
        raise MixedPrecisionError(f"pinned layers differ: sensitivity {sens.pinned}, cost {cost.pinned}")


def _guard_insensitive(sens: Sensitivity, cost: CostModel) -> tuple[CostModel, dict[int, int]]:
    """Layers whose ΔL is zero at every option are not free: their options all cost what the most expensive
    one costs, and they are set to it after solving (``{row: option}``). All of them zero is an error."""
    names = set(sens.insensitive)
    if not names:
        return cost, {}
    if len(names) == len(sens.layers):
        raise MixedPrecisionError(
            f"the sensitivity of every layer is 0 at every option ({len(names)} layers): the loss on the calibration "
            f"data does not change when any layer is quantized (a model whose output ignores its inputs, an "
            f"untrained head?), so there is nothing to allocate by. Check the model and the calibration data")
    rows = {i: int(np.argmax(cost.cost[i])) for i, n in enumerate(sens.layers) if n in names}
    guarded = cost.cost.copy()
    for i, k in rows.items():
        guarded[i, :] = guarded[i, k]
    listed = ", ".join(sorted(names)[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    warnings.warn(f"{len(names)} layer(s) have sensitivity 0 at every option (the loss does not depend on them): "
                  f"{listed}; kept at their highest option instead of being taken as free", stacklevel=3)
    return replace(cost, cost=guarded), rows


def _absolute_budget(cost: CostModel, budget: float | None, absolute: bool) -> float | None:
    if budget is None:
        return None
    if not np.isfinite(budget) or budget <= 0:
        raise MixedPrecisionError(
            f"budget={budget!r} must be positive: a fraction of the float model's {cost.unit} "
            f"(e.g. 0.15), or an absolute number of {cost.unit} with absolute=True"
        )
    return float(budget) if absolute else cost.absolute(budget)


def check_budget(cost: CostModel, budget: float, *, absolute: bool = False) -> float:
    """Raise :class:`InfeasibleBudgetError` unless ``budget`` (a fraction of the float cost, or absolute)
    can be met; returns the absolute budget. Needs only the cost model, so it runs before any measuring."""
    budget_abs = _absolute_budget(cost, budget, absolute)
    _check_budget(cost, budget_abs)
    return budget_abs


def _check_budget(cost: CostModel, budget_abs: float) -> None:
    smallest = cost.smallest()
    if budget_abs < smallest:
        rel = cost.relative(smallest)
        what = "weight bits" if cost.metric == "size" else "BOPs"
        raise InfeasibleBudgetError(
            f"a budget of {budget_abs:,.0f} {what} ({cost.relative(budget_abs):.2%} of the float model) cannot "
            f"be met: with every layer at its cheapest option and the pinned layers at their pins the model needs "
            f"{smallest:,} {what}, {rel:.2%} of the float model. The smallest feasible budget is {smallest:,} "
            f"{what} (a fraction of {_ceil4(rel)}); give at least that, or add lower bit-widths to the options",
            smallest, rel,
        )


def _ceil4(x: float) -> str:
    """``x`` rounded up to 4 decimals, so that a budget given as printed is feasible."""
    return f"{np.ceil(x * 1e4 - 1e-9) / 1e4:.4f}"


def _allocation(sens: Sensitivity, cost: CostModel, choice: list[int], method: str, objective: str,
                budget_abs: float | None, max_loss: float | None, seconds: float) -> Allocation:
    choices = {name: sens.options[k] for name, k in zip(sens.layers, choice)}
    every = {**{n: tuple(p) for n, p in sens.pinned.items()}, **choices}
    order = [n for n in cost.params if n in every] or list(every)  # the model's layer order
    total = cost.total(choice)
    return Allocation(
        bit_map={n: every[n] for n in order},
        predicted_loss=float(sum(sens.delta[i, k] for i, k in enumerate(choice))),
        cost=total, relative_cost=cost.relative(total), metric=cost.metric, unit=cost.unit, method=method,
        objective=objective, budget=budget_abs, relative_budget=None if budget_abs is None else cost.relative(budget_abs),
        max_loss=max_loss, seconds=seconds, choices=choices,
    )


def allocate(
    sensitivity: Sensitivity,
    cost: CostModel,
    budget: float | None = None,
    *,
    objective: str = "loss",
    max_loss: float | None = None,
    absolute: bool = False,
    time_limit: float | None = None,
) -> Allocation:
    """Solve the integer program for the best bit-width per layer.

    ``budget``: a fraction of the float model's cost (``0.15`` = 15 % of its weight bits or BOPs), or
    an absolute number of bits/BOPs with ``absolute=True``. ``objective="loss"`` minimises the
    predicted loss within ``budget``; ``objective="cost"`` minimises the cost with the predicted loss
    at most ``max_loss`` (and within ``budget`` if one is given). Raises
    :class:`InfeasibleBudgetError` / :class:`InfeasibleLossError` naming the smallest feasible value.
    """
    return allocate_best(sensitivity, cost, budget, 1, objective=objective, max_loss=max_loss, absolute=absolute,
                         time_limit=time_limit)[0]


def allocate_best(
    sensitivity: Sensitivity,
    cost: CostModel,
    budget: float | None = None,
    count: int = 5,
    *,
    objective: str = "loss",
    max_loss: float | None = None,
    absolute: bool = False,
    time_limit: float | None = None,
) -> list[Allocation]:
    """The integer program's ``count`` best allocations, best first (fewer if fewer are feasible).

    Each one is the optimum with the earlier ones excluded (a no-good cut per earlier solution), so
    the list is the exact top of the ranking by the objective. Used to re-rank near-optimal
    allocations by their measured loss (:func:`anybit.mixed.pick_measured`), since the additive model
    ``Σ ΔL`` ignores how layers interact. Arguments as for :func:`allocate`.
    """
    _check_pair(sensitivity, cost)
    cost, forced = _guard_insensitive(sensitivity, cost)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise MixedPrecisionError(f"count={count!r} must be a positive integer (the number of allocations wanted)")
    if objective not in OBJECTIVES:
        raise MixedPrecisionError(f"objective={objective!r} is unknown: expected 'loss' (within a budget) or 'cost' "
                                  f"(within max_loss)")
    budget_abs = _absolute_budget(cost, budget, absolute)
    if objective == "loss" and budget_abs is None:
        raise MixedPrecisionError("objective='loss' needs a budget (e.g. budget=0.15 for 15% of the float model)")
    if objective == "cost" and max_loss is None:
        raise MixedPrecisionError("objective='cost' needs max_loss, the largest predicted loss increase allowed")
    if max_loss is not None and (isinstance(max_loss, bool) or not isinstance(max_loss, (int, float))
                                 or not np.isfinite(max_loss)):
        raise MixedPrecisionError(f"max_loss={max_loss!r} must be a finite number (the largest predicted loss "
                                  f"increase allowed)")
    if budget_abs is not None:
        _check_budget(cost, budget_abs)
    delta = sensitivity.delta
    if max_loss is not None:
        least = float(delta.min(axis=1).sum())
        if max_loss < least - 1e-12:
            raise InfeasibleLossError(
                f"max_loss={max_loss:.6g} cannot be met: even with every layer at its least sensitive option the "
                f"predicted loss increase is {least:.6g}; the smallest feasible max_loss is {least:.6g}", least)

    n_layers, n_opts = delta.shape
    n = n_layers * n_opts
    # Costs relative to the float model and losses shifted per layer (a constant under the one-hot
    # constraint) and scaled to [0, 1] keep HiGHS's tolerances meaningful.
    rel_cost = cost.cost.astype(np.float64) / cost.float_cost
    shifted = delta - delta.min(axis=1, keepdims=True)
    loss_scale = float(shifted.max()) or 1.0
    rows = np.repeat(np.arange(n_layers), n_opts)
    one_hot = csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(n_layers, n))
    c = (shifted / loss_scale).ravel() if objective == "loss" else rel_cost.ravel()
    constraints = [LinearConstraint(one_hot, 1, 1)]
    for i, k in forced.items():            # insensitive layers: their highest option, so cuts stay exact
        fix = np.zeros(n)
        fix[i * n_opts + k] = 1.0
        constraints.append(LinearConstraint(csr_matrix(fix[None, :]), 1, 1))
    if max_loss is not None:
        constraints.append(LinearConstraint(csr_matrix(delta.ravel()[None, :]), -np.inf, max_loss))
    options = {"mip_rel_gap": 1e-9}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)

    found: list[Allocation] = []
    while len(found) < count:
        start = time.perf_counter()
        choice = _solve(c, constraints, options, cost, rel_cost, budget_abs, first=not found)
        if choice is None:
            break
        choice = [forced.get(i, k) for i, k in enumerate(choice)]
        found.append(_allocation(sensitivity, cost, choice, "ip", objective, budget_abs, max_loss,
                                 time.perf_counter() - start))
        # No-good cut: at most n_layers - 1 of this solution's choices may be repeated.
        row = np.zeros(n)
        row[[i * n_opts + k for i, k in enumerate(choice)]] = 1.0
        constraints.append(LinearConstraint(csr_matrix(row[None, :]), -np.inf, n_layers - 1))
    return found


def _solve(c, constraints, options, cost: CostModel, rel_cost, budget_abs: float | None,
           first: bool) -> list[int] | None:
    """One ``milp`` solve (re-solved with a tighter budget while HiGHS's tolerance lets it overshoot);
    the chosen option per layer, or ``None`` when no further solution exists (not for the first)."""
    n_layers, n_opts = rel_cost.shape
    slack = 0.0
    for _ in range(4):
        cons = list(constraints)
        if budget_abs is not None:
            rhs = (budget_abs - cost.fixed) / cost.float_cost - slack
            cons.append(LinearConstraint(csr_matrix(rel_cost.ravel()[None, :]), -np.inf, rhs))
        result = milp(c, integrality=np.ones(c.size), bounds=(0, 1), constraints=cons, options=options)
        if result.x is None:
            if not first and result.status == 2:      # infeasible: every allocation is excluded
                return None
            raise MixedPrecisionError(f"the integer program solver failed: {result.message}")
        if result.status != 0:
            warnings.warn(f"the integer program solver stopped early ({result.message}); the allocation is "
                          f"feasible but may not be optimal", stacklevel=3)
        choice = [int(k) for k in np.argmax(result.x.reshape(n_layers, n_opts), axis=1)]
        total = cost.total(choice)
        if budget_abs is None or total <= budget_abs:
            return choice
        # HiGHS met the budget within its feasibility tolerance only: tighten and solve again.
        slack += (total - budget_abs) / cost.float_cost + 1e-9
    raise MixedPrecisionError(f"the solver kept exceeding the budget {budget_abs:,.0f} {cost.unit}")


def allocate_greedy(sensitivity: Sensitivity, cost: CostModel, budget: float, *, absolute: bool = False) -> Allocation:
    """Greedy baseline: start with every layer at its most expensive option and repeatedly lower the
    layer whose next cheaper option adds the least predicted loss per unit of cost saved, until the
    budget is met."""
    _check_pair(sensitivity, cost)
    cost, forced = _guard_insensitive(sensitivity, cost)
    budget_abs = _absolute_budget(cost, budget, absolute)
    _check_budget(cost, budget_abs)
    start = time.perf_counter()
    delta, costs = sensitivity.delta, cost.cost
    n_layers = delta.shape[0]
    # Highest cost first; among equal costs the least sensitive option.
    choice = [max(range(costs.shape[1]), key=lambda k, i=i: (costs[i, k], -delta[i, k])) for i in range(n_layers)]
    total = cost.total(choice)
    while total > budget_abs:
        best = None
        for i in range(n_layers):
            cur = choice[i]
            cheaper = [k for k in range(costs.shape[1]) if costs[i, k] < costs[i, cur]]
            if not cheaper:
                continue
            nxt = max(cheaper, key=lambda k, i=i: (costs[i, k], -delta[i, k]))
            saved = int(costs[i, cur] - costs[i, nxt])
            ratio = (delta[i, nxt] - delta[i, cur]) / saved
            if best is None or ratio < best[0]:
                best = (ratio, i, nxt, saved)
        if best is None:  # cannot happen after _check_budget, kept as a guard
            raise MixedPrecisionError("greedy allocation ran out of cheaper options before meeting the budget")
        _, i, nxt, saved = best
        choice[i] = nxt
        total -= saved
    choice = [forced.get(i, k) for i, k in enumerate(choice)]
    return _allocation(sensitivity, cost, choice, "greedy", "loss", budget_abs, None, time.perf_counter() - start)


def uniform_allocation(sensitivity: Sensitivity, cost: CostModel, option: Option | int) -> Allocation:
    """Every free layer at ``option`` (pinned layers at their pins): the uniform reference point."""
    _check_pair(sensitivity, cost)
    if isinstance(option, int):
        matches = [o for o in sensitivity.options if o[0] == option]
        if not matches:
            raise MixedPrecisionError(f"{option}-bit is not one of the options {sensitivity.options}")
        option = matches[0]
    option = tuple(option)
    if option not in sensitivity.options:
        raise MixedPrecisionError(f"{option} is not one of the options {sensitivity.options}")
    k = sensitivity.options.index(option)
    return _allocation(sensitivity, cost, [k] * len(sensitivity.layers), f"uniform-{option_label(option)}",
                       "loss", None, None, 0.0)
