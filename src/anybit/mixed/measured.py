"""Re-rank near-optimal allocations by the loss they give when measured, not predicted.

The integer program ranks allocations by ``Σ ΔL``, which treats layers as independent. Two
allocations a few hundredths apart in that sum can differ more once every layer is lowered together
(errors compound through the network; shared BatchNorm statistics fit some mixes worse). Measuring the
integer program's few best allocations on the calibration data and keeping the lowest costs one pass
over that data per candidate, and never breaks the budget: every candidate meets it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..progress import progress
from ..quant import get_precision, set_precision
from .bitmap import apply_allocation
from .calib import calibration_batches, check_loss, dataset_loss, dataset_loss_sum, float_targets
from .errors import MixedPrecisionError
from .setup import LayerSetup
from .solver import Allocation


def pick_measured(
    model: nn.Module,
    candidates: Sequence[Allocation],
    calib_data,
    *,
    loss: str = "kl",
    layer_setup: LayerSetup | None = None,
    batch_size: int = 256,
    quiet: bool = False,
    distributed=None,
) -> Allocation:
    """The candidate with the lowest loss measured on ``calib_data`` with every layer at its chosen
    precision (``"kl"`` to the float model's outputs, or ``"ce"`` to the labels).

    Every candidate's ``measured_loss`` is filled in; the one returned also lists all of them in
    ``ranking`` (predicted and measured loss, in the integer program's order). ``layer_setup``
    calibrates a post-training-quantized model for each candidate, as in :func:`apply_allocation`.
    The model's precision is restored afterwards. ``distributed`` (a DistContext): every rank measures
    every candidate on its share of the calibration batches, and the losses are summed over the ranks.
    """
    if not candidates:
        raise MixedPrecisionError("no candidate allocations to choose from: give at least one")
    batches = calibration_batches(calib_data, batch_size, next(model.parameters()).device)
    check_loss(loss, batches)
    ranks = distributed if distributed is not None and distributed.enabled else None
    if ranks is not None:
        batches = batches[ranks.rank::ranks.world_size]
    saved = get_precision(model)
    was_training = model.training
    model.eval()
    try:
        targets = float_targets(model, batches)
        for alloc in progress(candidates, desc="measure candidates", quiet=quiet or (ranks and not ranks.is_main)):
            apply_allocation(model, alloc, layer_setup)
            if ranks is None:
                alloc.measured_loss = dataset_loss(model, batches, targets, loss)
            else:   # loss sums and counts (samples or tokens) of every rank's batches
                local = dataset_loss_sum(model, batches, targets, loss)
                total = ranks.all_reduce_(torch.tensor(local, dtype=torch.float64))
                alloc.measured_loss = float(total[0] / total[1].clamp_min(1))
    finally:
        set_precision(model, saved)
        model.train(was_training)
    best = min(candidates, key=lambda a: a.measured_loss)
    best.ranking = [{"rank": i + 1, "predicted_loss": a.predicted_loss, "measured_loss": a.measured_loss,
                     "relative_cost": a.relative_cost, "chosen": a is best} for i, a in enumerate(candidates)]
    return best
