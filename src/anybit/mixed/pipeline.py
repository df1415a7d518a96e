"""One call from a model and calibration data to an applied allocation (used by the PTQ pipelines)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..inputs import take
from .bitmap import apply_allocation
from .calib import calibration_batches
from .cost import cost_model
from .errors import MixedPrecisionError
from .sensitivity import sensitivity
from .setup import LayerSetup, MinMaxSetup
from .measured import pick_measured
from .solver import Allocation, allocate_best, allocate_greedy


def allocate_for_model(
    model: nn.Module,
    calib_data,
    budget: float | None,
    metric: str = "size",
    options: str | Iterable[int | Sequence[int]] = (2, 3, 4, 8),
    layer_setup: LayerSetup | None = None,
    *,
    a_bits: int | None = None,
    objective: str = "loss",
    max_loss: float | None = None,
    method: str = "ip",
    candidates: int = 1,
    loss: str = "kl",
    example_input: torch.Tensor | None = None,
    cache_path: str | os.PathLike | None = None,
    apply: bool = True,
    batch_size: int = 256,
    quiet: bool = False,
) -> Allocation:
    """Sensitivity → cost model → integer program, and (``apply=True``) the model calibrated with
    ``layer_setup`` for the chosen precisions and set to them.

    ``budget`` is a fraction of the float model's weight bits (``metric="size"``) or BOPs
    (``metric="bops"``). ``method="greedy"`` uses the greedy baseline instead of the integer program.
    ``candidates > 1``: the integer program's best ``candidates`` allocations are measured on
    ``calib_data`` and the one with the lowest measured loss is kept (:func:`pick_measured`).
    ``example_input`` (for counting MACs) defaults to the first calibration sample.
    """
    if method not in ("ip", "greedy"):
        raise MixedPrecisionError(f"method={method!r} is unknown: expected 'ip' (integer program) or 'greedy'")
    if method == "greedy" and candidates > 1:
        raise MixedPrecisionError("candidates re-ranks the integer program's best allocations; not with method='greedy'")
    if method == "greedy" and objective != "loss":
        raise MixedPrecisionError("the greedy baseline only minimises the loss within a budget (objective='loss')")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = calibration_batches(calib_data, batch_size, device)
    if example_input is None:
        example_input = take(batches[0][0], slice(0, 1))
    sens = sensitivity(model, batches, options, a_bits=a_bits, loss=loss, layer_setup=layer_setup,
                       cache_path=cache_path, batch_size=batch_size, quiet=quiet)
    cost = cost_model(model, options, metric, example_input, a_bits=a_bits)
    if method == "greedy":
        alloc = allocate_greedy(sens, cost, budget)
    else:
        best = allocate_best(sens, cost, budget, candidates, objective=objective, max_loss=max_loss)
        alloc = best[0] if len(best) == 1 else pick_measured(model, best, batches, loss=loss, layer_setup=layer_setup,
                                                             batch_size=batch_size, quiet=quiet)
    if apply:
        apply_allocation(model, alloc, layer_setup)
    return alloc


def ptq_bit_allocator(
    budget: float,
    metric: str = "size",
    options: str | Iterable[int | Sequence[int]] = (2, 3, 4, 8),
    layer_setup: LayerSetup | None = None,
    **kwargs,
):
    """A ``bit_allocator`` for :func:`anybit.ptq.quantize`: ``allocator(model, float_model, calib) -> bit map``.

    Runs :func:`allocate_for_model` on the PTQ copy without applying it (the PTQ pipeline sets the
    precision and calibrates what is missing). Without ``layer_setup`` each option is calibrated by
    :class:`MinMaxSetup` on ``calib``. The last :class:`Allocation` is kept as ``allocator.last``.
    Other keyword arguments go to :func:`allocate_for_model` (``a_bits``, ``method``, ``cache_path``, ...).
    """
    def allocator(model: nn.Module, float_model: nn.Module | None, calib) -> dict:
        setup = layer_setup if layer_setup is not None else MinMaxSetup(calib)
        alloc = allocate_for_model(model, calib, budget, metric, options, setup, apply=False, **kwargs)
        allocator.last = alloc
        return dict(alloc.bit_map)

    allocator.last = None
    return allocator
