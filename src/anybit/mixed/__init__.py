"""Mixed precision by integer programming: a bit-width per layer under a size or BOPs budget.

Measure each layer's sensitivity at each bit-width (:func:`sensitivity`), count what each choice
costs (:func:`cost_model`), and pick the allocation with the least predicted loss within a budget
(:func:`allocate`, ``scipy.optimize.milp``) — for multi-bit networks (every layer already runs at
every bit-width) and for post-training-quantized models (a ``layer_setup`` hook calibrates each
layer at each bit-width). :func:`allocate_for_model` does it all in one call.

    sens = anybit.mixed.sensitivity(model, calib_images, options=[2, 3, 4, 8], cache_path="sens.json")
    cost = anybit.mixed.cost_model(model, [2, 3, 4, 8], "size", calib_images[:1])
    alloc = anybit.mixed.allocate(sens, cost, budget=0.13)     # 13% of the float weight bits
    anybit.set_precision(model, alloc.bit_map)
"""

from .bitmap import apply_allocation, bit_map_to_json, load_bit_map, prepare, save_bit_map
from .calib import calibration_batches, data_fingerprint, model_fingerprint
from .cost import METRICS, CostModel, cost_model
from .errors import (
    BitMapError,
    BitMapNotFoundError,
    InfeasibleBudgetError,
    InfeasibleError,
    InfeasibleLossError,
    MixedBitsError,
    MixedPrecisionError,
)
from .measured import pick_measured
from .options import option_label, resolve_options
from .pareto import draw_pareto, parse_sweep, pareto_markdown, plot_pareto, sweep, write_pareto
from .pipeline import allocate_for_model, ptq_bit_allocator
from .sensitivity import Sensitivity, sensitivity
from .setup import LayerSetup, MinMaxSetup, needs_calibration
from .solver import Allocation, allocate, allocate_best, allocate_greedy, check_budget, uniform_allocation

__all__ = [
    "Allocation", "BitMapError", "BitMapNotFoundError", "CostModel", "InfeasibleBudgetError", "InfeasibleError",
    "InfeasibleLossError", "LayerSetup", "METRICS", "MinMaxSetup", "MixedBitsError", "MixedPrecisionError", "Sensitivity",
    "allocate", "allocate_best", "allocate_for_model", "allocate_greedy", "apply_allocation", "bit_map_to_json",
    "calibration_batches", "check_budget", "cost_model", "draw_pareto", "data_fingerprint", "load_bit_map", "model_fingerprint",
    "needs_calibration", "option_label", "parse_sweep", "pick_measured", "ptq_bit_allocator", "pareto_markdown", "plot_pareto", "prepare",
    "resolve_options", "save_bit_map", "sensitivity", "sweep", "uniform_allocation", "write_pareto",
]
