"""PTQ pipelines: a list of stage functions run in order on a quantized copy of a float model.

=========== ==========================================================================
``rtn``      round to nearest, min/max ranges
``mse``      round to nearest, MSE-searched ranges
``adaquant`` MSE ranges + AdaQuant (parallel or sequential)
``light``    MSE ranges + bit allocation + BN tuning
``advanced`` MSE ranges + bit allocation + AdaQuant + BN tuning + bias tuning
=========== ==========================================================================

A stage is a function ``stage(ctx: PTQContext) -> dict`` (what it changed, for the report);
pipelines are lists of stage names, so a new stage (such as integer-programming bit allocation
from :mod:`anybit.mixed`) is inserted by name or passed as a callable. Bit allocation runs only
when a ``bit_allocator`` is given; otherwise every layer stays at the uniform ``w_bits/a_bits``
(first and last layer at ``keep_first_last``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from ..inputs import Inputs, is_keyword_inputs, num_samples, take, to_device
from ..quant import DEFAULT_KEEP_FIRST_LAST, check_bits, check_layers_run, get_precision, quant_layers, set_precision
from ..quant.functional import ACT_GRANULARITIES
from . import layerwise as aq
from .calibdata import CalibData, calibration_tensor
from .errors import PTQError
from .floatcopy import check_quantizable, float_copy, ptq_convert
from .graph import LayerGraph, PostOp, analyse
from .ranges import has_ranges, init_ranges, smooth
from .tuning import (
    DEFAULT_BIAS_BATCH_SIZE,
    DEFAULT_BIAS_ITERS,
    DEFAULT_BIAS_LR,
    bias_tuning,
    bn_tuning,
    float_logits,
    has_batchnorm,
    logits_kl,
    output_kind,
)

PIPELINES: dict[str, tuple[str, ...]] = {
    "rtn": ("ranges_minmax",),
    "mse": ("ranges_mse",),
    "adaquant": ("ranges_mse", "adaquant"),
    "light": ("ranges_mse", "allocate_bits", "bn_tuning"),
    "advanced": ("ranges_mse", "allocate_bits", "adaquant", "bn_tuning", "bias_tuning"),
}

BitAllocator = Callable[..., Any]
"""``allocator(model, float_model, calib) -> bit map`` (anything :func:`anybit.set_precision` accepts)."""


@dataclass
class PTQConfig:
    """Every PTQ setting, with defaults; validated on creation (messages name the bad field)."""

    w_bits: int = 4
    a_bits: int = 4
    pipeline: str = "advanced"
    keep_first_last: int | None = DEFAULT_KEEP_FIRST_LAST
    act_granularity: str = "auto"
    smooth_alpha: float | str | None = "auto"
    adaquant_mode: str = "sequential"
    adaquant_caching: str = "auto"
    iters: int = aq.DEFAULT_ITERS
    batch_size: int = aq.DEFAULT_BATCH_SIZE
    lr_weight: float | None = None
    lr_bias: float = aq.DEFAULT_LR_BIAS
    lr_weight_range: float = aq.DEFAULT_LR_WEIGHT_RANGE
    lr_act_range: float = aq.DEFAULT_LR_ACT_RANGE
    bn_batch_size: int = 128
    bias_iters: int = DEFAULT_BIAS_ITERS
    bias_batch_size: int = DEFAULT_BIAS_BATCH_SIZE
    bias_lr: float = DEFAULT_BIAS_LR
    max_cache_bytes: int = aq.DEFAULT_MAX_CACHE_BYTES
    val_fraction: float | None = None
    eval_every: int = aq.DEFAULT_EVAL_EVERY
    patience: int = aq.DEFAULT_PATIENCE
    num_samples: int | None = None
    skip: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        if self.keep_first_last is not None:
            check_bits(self.keep_first_last, "keep_first_last")
        if self.act_granularity not in ("auto", *ACT_GRANULARITIES):
            raise PTQError(f"act_granularity={self.act_granularity!r} is unknown: expected 'auto' or one of "
                           f"{list(ACT_GRANULARITIES)}")
        if self.smooth_alpha not in (None, "auto") and (isinstance(self.smooth_alpha, bool) or not isinstance(
                self.smooth_alpha, (int, float)) or not 0 <= self.smooth_alpha <= 1):
            raise PTQError(f"smooth_alpha={self.smooth_alpha!r} is invalid: expected None (no smoothing), 'auto' "
                           f"or a migration strength in [0, 1]")
        if isinstance(self.pipeline, str) and self.pipeline not in PIPELINES:
            raise PTQError(f"pipeline={self.pipeline!r} is unknown: expected one of {list(PIPELINES)} "
                           f"or a list of stages from {list(STAGES)}")
        aq.check_settings(self.adaquant_mode, self.iters, self.batch_size,
                          {"lr_weight": aq.DEFAULT_LR_WEIGHT if self.lr_weight is None else self.lr_weight,
                           "lr_bias": self.lr_bias,
                           "lr_weight_range": self.lr_weight_range, "lr_act_range": self.lr_act_range},
                          self.max_cache_bytes)
        aq.check_early_stopping(self.val_fraction, self.eval_every, self.patience)
        if self.adaquant_caching not in aq.CACHING:
            raise PTQError(f"adaquant_caching={self.adaquant_caching!r} is unknown: expected one of {list(aq.CACHING)}")
        for name in ("bn_batch_size", "bias_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise PTQError(f"{name}={value!r} is invalid: expected an integer >= 2")
        if isinstance(self.bias_iters, bool) or not isinstance(self.bias_iters, int) or self.bias_iters < 0:
            raise PTQError(f"bias_iters={self.bias_iters!r} is invalid: expected an integer >= 0")
        if not (isinstance(self.bias_lr, (int, float)) and self.bias_lr > 0):
            raise PTQError(f"bias_lr={self.bias_lr!r} is invalid: expected a positive number")
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int)
                                             or self.num_samples < 1):
            raise PTQError(f"num_samples={self.num_samples!r} is invalid: expected a positive integer or None")
        self.skip = tuple(self.skip)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not isinstance(self.pipeline, str):
            d["pipeline"] = [_stage_name(s) for s in self.pipeline]
        return d


@dataclass
class PTQContext:
    """What stages work on: the quantized model, the float reference, the calibration inputs."""

    model: nn.Module
    float_model: nn.Module
    calib: Inputs
    config: PTQConfig
    graph: LayerGraph
    device: torch.device
    quiet: bool = True
    bit_allocator: BitAllocator | None = None
    range_method: str = "mse"
    smooth_alpha: float | None = None
    _reference_logits: torch.Tensor | None = None

    def reference_logits(self) -> torch.Tensor:
        """The float model's outputs (logits, or hidden states) on the calibration set, computed once."""
        if self._reference_logits is None:
            self._reference_logits = float_logits(self.float_model, self.calib, self.device)
        return self._reference_logits


@dataclass
class PTQReport:
    """What a pipeline did: stages with their results and wall time, per-layer errors, final precision."""

    pipeline: list[str]
    config: dict
    stages: list[dict] = field(default_factory=list)
    layers: dict[str, dict] = field(default_factory=dict)
    precision: dict[str, list[int]] = field(default_factory=dict)
    graph: str = ""
    kl: dict[str, float] = field(default_factory=dict)
    output: str = "logits"
    seconds: float = 0.0
    measure_seconds: float = 0.0

    def stage_seconds(self) -> dict[str, float]:
        return {s["name"]: s["seconds"] for s in self.stages}

    @property
    def calibration_seconds(self) -> float:
        """Wall time of the stages themselves (without the report's measurements)."""
        return sum(s["seconds"] for s in self.stages)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- stages

def _ranges(ctx: PTQContext, method: str) -> dict:
    ctx.range_method = method
    smoothing = None
    if ctx.smooth_alpha is not None:
        smoothing = smooth(ctx.model, ctx.calib, ctx.smooth_alpha, device=ctx.device, quiet=ctx.quiet)
    result = init_ranges(ctx.model, ctx.calib, method, device=ctx.device, seed=ctx.config.seed, quiet=ctx.quiet)
    return {"method": method, "layers": result, **({"smoothing_spread": smoothing} if smoothing is not None else {})}


def stage_ranges_minmax(ctx: PTQContext) -> dict:
    """Min/max weight (per channel) and input (per tensor) ranges at the current precision."""
    return _ranges(ctx, "minmax")


def stage_ranges_mse(ctx: PTQContext) -> dict:
    """MSE-searched weight and input ranges at the current precision."""
    return _ranges(ctx, "mse")


def stage_allocate_bits(ctx: PTQContext) -> dict:
    """Per-layer bit-widths from ``bit_allocator``; without one, the uniform precision stays."""
    if ctx.bit_allocator is None:
        return {"skipped": "no bit allocator or budget given: uniform precision",
                "w_bits": ctx.config.w_bits, "a_bits": ctx.config.a_bits}
    before = get_precision(ctx.model)
    bit_map = ctx.bit_allocator(ctx.model, ctx.float_model, ctx.calib)
    set_precision(ctx.model, bit_map)
    after = get_precision(ctx.model)
    changed = [n for n, m in quant_layers(ctx.model).items() if after[n] != before[n] or not has_ranges(m)]
    if changed:  # the allocator may have calibrated its options its own way: use this pipeline's ranges
        init_ranges(ctx.model, ctx.calib, ctx.range_method, layers=changed, device=ctx.device,
                    seed=ctx.config.seed, quiet=ctx.quiet)
    return {"precision": {n: list(p) for n, p in after.items()}, "changed": changed}


def stage_adaquant(ctx: PTQContext) -> dict:
    """AdaQuant on every quantized Conv2d/Linear layer (see :func:`anybit.ptq.adaquant`)."""
    c = ctx.config
    return aq.adaquant(ctx.model, ctx.calib, mode=c.adaquant_mode, iters=c.iters, batch_size=c.batch_size,
                       lr_weight=c.lr_weight, lr_bias=c.lr_bias, lr_weight_range=c.lr_weight_range,
                       lr_act_range=c.lr_act_range, init=ctx.range_method, float_model=ctx.float_model,
                       max_cache_bytes=c.max_cache_bytes, caching=c.adaquant_caching, seed=c.seed, quiet=ctx.quiet,
                       graph=ctx.graph, val_fraction=c.val_fraction, eval_every=c.eval_every, patience=c.patience)


def stage_bn_tuning(ctx: PTQContext) -> dict:
    """Re-estimate BatchNorm statistics on the calibration data, quantized (kept if the logits' KL drops);
    nothing at all (no pass over the data) for a model without BatchNorm."""
    if not has_batchnorm(ctx.model):
        return {"batchnorms": 0, "skipped": "the model has no BatchNorm"}
    return bn_tuning(ctx.model, ctx.calib, batch_size=ctx.config.bn_batch_size, float_model=ctx.float_model,
                     reference_logits=ctx.reference_logits(), quiet=ctx.quiet)


def stage_bias_tuning(ctx: PTQContext) -> dict:
    """Tune biases and BatchNorm affine terms to the float model's logits (KL)."""
    c = ctx.config
    return bias_tuning(ctx.model, ctx.float_model, ctx.calib, iters=c.bias_iters, batch_size=c.bias_batch_size,
                       lr=c.bias_lr, reference_logits=ctx.reference_logits(), seed=c.seed, quiet=ctx.quiet)


STAGES: dict[str, Callable[[PTQContext], dict]] = {
    "ranges_minmax": stage_ranges_minmax,
    "ranges_mse": stage_ranges_mse,
    "allocate_bits": stage_allocate_bits,
    "adaquant": stage_adaquant,
    "bn_tuning": stage_bn_tuning,
    "bias_tuning": stage_bias_tuning,
}
_RANGE_STAGES = ("ranges_minmax", "ranges_mse")
LAYER_STAGES = (*_RANGE_STAGES, "allocate_bits", "adaquant")
"""Stages that change layers one by one (their effect is measured per layer; the others by the logits' KL)."""


def _stage_name(stage) -> str:
    return stage if isinstance(stage, str) else getattr(stage, "__name__", type(stage).__name__)


def resolve_pipeline(pipeline: str | Sequence) -> list[tuple[str, Callable[[PTQContext], dict]]]:
    """``(name, function)`` of each stage of a named pipeline or of a list of stage names/callables."""
    if isinstance(pipeline, str):
        if pipeline not in PIPELINES:
            raise PTQError(f"pipeline={pipeline!r} is unknown: expected one of {list(PIPELINES)}")
        pipeline = PIPELINES[pipeline]
    stages = []
    for stage in pipeline:
        if callable(stage):
            stages.append((_stage_name(stage), stage))
        elif stage in STAGES:
            stages.append((stage, STAGES[stage]))
        else:
            raise PTQError(f"stage {stage!r} is unknown: expected one of {list(STAGES)} or a function of a PTQContext")
    if not stages or stages[0][0] not in _RANGE_STAGES:
        raise PTQError(f"a pipeline must start with a range stage ({' or '.join(_RANGE_STAGES)}), "
                       f"got {[n for n, _ in stages]}")
    return stages


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


SEQUENCE_SMOOTH_ALPHA = 0.5
"""Smoothing strength ``smooth_alpha="auto"`` uses for sequence models (keyword inputs) at 4 activation
bits or fewer. Measured on all-MiniLM-L6-v2 (docs/transformers.md): it lifts W4A4 and hurts AdaQuant at
W4A8, where the 4-bit weights pay for the outliers moved into them."""


def resolve_smoothing(config: PTQConfig, calib: Inputs) -> float | None:
    """The smoothing strength a pipeline applies: ``config.smooth_alpha``, with ``"auto"`` meaning
    :data:`SEQUENCE_SMOOTH_ALPHA` for keyword inputs at ``a_bits <= 4`` and no smoothing otherwise."""
    if config.smooth_alpha != "auto":
        return config.smooth_alpha
    return SEQUENCE_SMOOTH_ALPHA if is_keyword_inputs(calib) and config.a_bits <= 4 else None


def quantize(
    model: nn.Module,
    calib_data: CalibData,
    w_bits: int | None = None,
    a_bits: int | None = None,
    pipeline: str | Sequence | None = None,
    *,
    config: PTQConfig | None = None,
    bit_allocator: BitAllocator | None = None,
    device: str | torch.device | None = None,
    quiet: bool = False,
    measure: bool = True,
    on_stage_end: Callable[[str, nn.Module], None] | None = None,
    **options: Any,
) -> tuple[nn.Module, PTQReport]:
    """Post-training quantize a float model; returns ``(quantized_model, report)``.

    ``model`` is any float ``nn.Module`` (or a converted one, used at 32 bits); it is not modified:
    a copy is converted with per-channel asymmetric weights and per-tensor activations, set to
    ``w_bits``/``a_bits`` (default 4/4; first and last layer at ``keep_first_last``, default 8) and
    calibrated by the stages of ``pipeline`` (default ``"advanced"``). ``calib_data`` is a tensor, a
    Dataset or a DataLoader (labels not needed), or keyword inputs for ``model(**inputs)`` -- a tokenizer's
    output, e.g. from :func:`anybit.data.text_calibration` (padding is left out of every range, error and
    loss). A model whose output has no logits (a feature extractor) is compared on its last hidden
    states (``report.output == "hidden"``). Further settings (``adaquant_mode``, ``iters``,
    ``batch_size``, learning rates, ``num_samples``, ``max_cache_bytes``, ``seed``, ...) are
    :class:`PTQConfig` fields, given as keyword arguments or as ``config``. Everything is validated
    before any work starts. ``measure`` adds per-layer output errors and the output discrepancy (KL
    divergence of the logits, or relative squared error of the hidden states) before and after to the
    report (``report.kl``); ``quiet=False`` shows progress bars when stderr is a terminal; ``on_stage_end(name, model)`` is called after each stage.
    """
    given = {k: v for k, v in (("w_bits", w_bits), ("a_bits", a_bits), ("pipeline", pipeline)) if v is not None}
    if "pipeline" in given and not isinstance(given["pipeline"], str):
        given["pipeline"] = list(given["pipeline"])
    base = {f.name: getattr(config, f.name) for f in fields(config)} if config is not None else {}
    config = PTQConfig(**{**base, **given, **options})
    stages = resolve_pipeline(config.pipeline)
    check_quantizable(model)
    start = time.perf_counter()
    device = torch.device(device) if device is not None else _device_of(model)
    calib = calibration_tensor(calib_data, config.num_samples, config.seed)

    float_model = float_copy(model).to(device).eval()
    example = to_device(take(calib, slice(0, 2)), device)
    granularity = config.act_granularity
    if granularity == "auto":   # per-token ranges for sequence models (measured: docs/transformers.md)
        granularity = "token" if is_keyword_inputs(calib) else "tensor"
    qmodel = ptq_convert(float_model, config.keep_first_last, config.skip, example,
                         act_granularity=granularity).eval()
    check_layers_run(qmodel, take(example, slice(0, 1)))   # layers whose weight the parent uses directly stay float
    set_precision(qmodel, (config.w_bits, config.a_bits))
    graph = analyse(qmodel, example)
    if any(name == "adaquant" for name, _ in stages):
        names = [n for n in graph.order if not quant_layers(qmodel)[n].is_float]
        aq.check_cache(graph, names, num_samples(calib), config.max_cache_bytes)

    ctx = PTQContext(qmodel, float_model, calib, config, graph, device, quiet, bit_allocator,
                     smooth_alpha=resolve_smoothing(config, calib))
    report = PTQReport(pipeline=[n for n, _ in stages], config=config.to_dict(), graph=graph.method,
                       output=output_kind(float_model, calib, device))
    last_local = max(i for i, (n, _) in enumerate(stages) if n in LAYER_STAGES)
    targets = ctx.reference_logits() if measure else None
    measure_s = 0.0
    for index, (name, stage) in enumerate(stages):
        t0 = time.perf_counter()
        result = stage(ctx) or {}
        report.stages.append({"name": name, "seconds": time.perf_counter() - t0, "result": result})
        t0 = time.perf_counter()
        if measure and index in (0, last_local):
            key = "mse_init" if index == 0 else "mse_calibrated"
            for layer, mse in aq.layer_errors(qmodel, float_model, calib, graph, device).items():
                report.layers.setdefault(layer, {})[key] = mse
                if index == last_local and index == 0:
                    report.layers[layer]["mse_calibrated"] = mse
        if measure and index == 0:
            report.kl["init"] = logits_kl(qmodel, targets, calib, device)
        measure_s += time.perf_counter() - t0
        if on_stage_end is not None:
            on_stage_end(name, qmodel)
    if measure:
        t0 = time.perf_counter()
        report.kl["final"] = logits_kl(qmodel, targets, calib, device)
        measure_s += time.perf_counter() - t0
    report.measure_seconds = measure_s
    for layer, (wb, ab) in get_precision(qmodel).items():
        entry = report.layers.setdefault(layer, {})
        entry.update({"w_bits": wb, "a_bits": ab, "post_op": graph.post.get(layer, PostOp()).describe()})
    report.precision = {n: list(p) for n, p in get_precision(qmodel).items()}
    report.seconds = time.perf_counter() - start
    qmodel.anybit_meta = {**qmodel.anybit_meta, "ptq": {"pipeline": report.pipeline, "w_bits": config.w_bits,
                                                        "a_bits": config.a_bits,
                                                        "keep_first_last": config.keep_first_last,
                                                        "act_granularity": granularity,
                                                        "smooth_alpha": ctx.smooth_alpha}}
    return qmodel.eval(), report
