"""AdaQuant: layer-wise calibration of weights, bias and quantization ranges.

For each quantized layer with float input ``X`` and float output ``Y`` (after the BatchNorm and
ReLU that consume it, when the graph shows they do), Adam minimises ``||Y - post(Q(W+V) Q(X) + b')||^2``
over mini-batches of the calibration set through the straight-through estimator; ``V``, ``b'``,
the per-channel weight grid (scale, zero point) and the per-tensor input range are learnt.

* ``mode="parallel"``: every layer's ``X`` comes from the float model.
* ``mode="sequential"``: layer ``i``'s ``X`` is produced by the model whose layers before ``i``
  are already quantized and calibrated -- for the whole calibration set, recomputed for every layer.

Only one layer's inputs and outputs are held at a time; their size is estimated before any work
and compared with ``max_cache_bytes``. BatchNorm is not folded into the weights: it is applied, in
inference mode, to both sides of the comparison (equivalent to calibrating the folded layer), and
a bias-free convolution followed by a BatchNorm learns its bias correction into the BatchNorm's
running mean (``BN(y + b) = BN'(y)`` with ``running_mean' = running_mean - b``), so the model's
structure and checkpoint format stay unchanged.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..progress import progress
from ..inputs import Inputs, is_keyword_inputs, real_positions, run_model, take, to_device, token_mask, trim_padding
from ..inputs import num_samples as count_samples
from ..quant import (
    DEFAULT_KEEP_FIRST_LAST,
    FLOAT_BITS,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    convert,
    precision,
    quant_layers,
    set_precision,
)
from .calibdata import CalibData, batches, calibration_tensor
from .errors import CacheTooLargeError, PTQError
from .floatcopy import PTQ_SPEC, check_quantizable, float_copy
from .graph import LayerGraph, PostOp, analyse, trace
from .ranges import check_method, has_ranges, init_ranges

MODES = ("parallel", "sequential")
CACHING = ("auto", "graph", "stream", "passes")
DEFAULT_ITERS = 50
DEFAULT_BATCH_SIZE = 50
DEFAULT_LR_WEIGHT = 3e-2
SEQUENCE_LR_WEIGHT = 1e-2
"""``lr_weight`` for models calibrated on keyword inputs (transformers on text): 3e-2, measured best on
ResNet-20, made a 4-bit MiniLM worse than its MSE ranges; 1e-2 is the best of those measured there
(docs/transformers.md)."""
DEFAULT_LR_BIAS = 1e-3
DEFAULT_LR_WEIGHT_RANGE = 1e-3
DEFAULT_LR_ACT_RANGE = 1e-2
DEFAULT_MAX_CACHE_BYTES = 4 * 2**30
SEQUENCE_VAL_FRACTION = 0.2
"""``val_fraction`` for keyword inputs (``val_fraction=None``); image models keep 0, as measured on ResNet-20."""
DEFAULT_EVAL_EVERY = 10
DEFAULT_PATIENCE = 2
FORWARD_BATCH = 256


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layer of interest has been seen."""


def _check_positive(name: str, value, minimum=1, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value < minimum:
        raise PTQError(f"{name}={value!r} is invalid: expected {'a number' if kind is float else 'an integer'} "
                       f">= {minimum}")


def check_settings(mode: str, iters: int, batch_size: int, lrs: dict[str, float], max_cache_bytes: int) -> None:
    """Validate AdaQuant settings up front, naming the bad parameter."""
    if mode not in MODES:
        raise PTQError(f"mode={mode!r} is unknown: expected one of {list(MODES)}")
    _check_positive("iters", iters, 0)
    _check_positive("batch_size", batch_size, 1)
    _check_positive("max_cache_bytes", max_cache_bytes, 1)
    for name, value in lrs.items():
        _check_positive(name, value, 0, float)


def default_lr_weight(calib: Inputs) -> float:
    """The weight learning rate for ``lr_weight=None``: :data:`SEQUENCE_LR_WEIGHT` for keyword inputs (text
    transformers), :data:`DEFAULT_LR_WEIGHT` otherwise."""
    return SEQUENCE_LR_WEIGHT if is_keyword_inputs(calib) else DEFAULT_LR_WEIGHT


def check_early_stopping(val_fraction: float | None, eval_every: int, patience: int) -> None:
    """Validate the held-out early-stopping settings of AdaQuant."""
    if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
                                     or not 0 <= val_fraction < 1):
        raise PTQError(f"val_fraction={val_fraction!r} is invalid: expected a fraction in [0, 1) (0: no held-out set) "
                       f"or None (0.2 for keyword inputs, 0 otherwise)")
    _check_positive("eval_every", eval_every, 1)
    _check_positive("patience", patience, 1)


@contextlib.contextmanager
def _inference(model: nn.Module, float_mode: bool = False):
    """Eval mode (and full precision if asked and the model is converted), restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        if float_mode and quant_layers(model):
            with precision(model, FLOAT_BITS):
                yield
        else:
            yield
    finally:
        model.train(was_training)


class _Buffer:
    """Collects per-batch tensors into one preallocated tensor (falls back to a list for odd shapes)."""

    def __init__(self, total: int) -> None:
        self.total, self.filled, self.data, self.parts = total, 0, None, []

    def add(self, t: torch.Tensor) -> None:
        t = t.detach()
        if self.data is None and not self.parts:
            self.data = torch.empty((self.total, *t.shape[1:]), dtype=t.dtype, device=t.device)
        if self.data is not None and t.shape[1:] == self.data.shape[1:] and self.filled + t.shape[0] <= self.total:
            self.data[self.filled:self.filled + t.shape[0]].copy_(t)
            self.filled += t.shape[0]
            return
        if self.data is not None:
            self.parts, self.data = [self.data[:self.filled]], None
        self.parts.append(t.clone())

    def tensor(self) -> torch.Tensor:
        if self.data is not None:
            return self.data[:self.filled]
        return torch.cat(self.parts)


@torch.no_grad()
def capture(model: nn.Module, name: str, calib: Inputs, calls: int, device, *, inputs: bool = True,
            post: PostOp | None = None, float_mode: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Inputs of layer ``name`` (and its post-op outputs if ``post`` is given) for the whole of ``calib``.

    Each forward pass stops as soon as the layer has run ``calls`` times, so later layers cost nothing.
    For keyword inputs with an ``attention_mask`` only real tokens are kept: rows ``(n_tokens, features)``.
    """
    module = model.get_submodule(name)
    total = _rows(calib) * calls
    xs = _Buffer(total) if inputs else None
    ys = _Buffer(total) if post is not None else None
    seen = [0]

    def pre_hook(m, args):
        xs.add(real_positions(args[0]))
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    def hook(m, args, out):
        if xs is not None:
            xs.add(real_positions(args[0]))
        ys.add(real_positions(post.apply(out, model)))
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    handle = module.register_forward_hook(hook) if post is not None else module.register_forward_pre_hook(pre_hook)
    try:
        with _inference(model, float_mode):
            for x in batches(calib, FORWARD_BATCH, device):
                seen[0] = 0
                try:
                    run_model(model, x)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return (xs.tensor() if xs is not None else None), (ys.tensor() if ys is not None else None)


def _rows(calib: Inputs) -> int:
    """Rows a layer's cache holds per call: samples, or real tokens of keyword inputs with a mask."""
    mask = token_mask(calib)
    return int(mask.sum()) if mask is not None else count_samples(calib)


def _row_samples(calib: Inputs) -> torch.Tensor:
    """The sample each cached row comes from (in cache order)."""
    mask = token_mask(calib)
    return mask.nonzero()[:, 0] if mask is not None else torch.arange(count_samples(calib))


def _tensor_bytes(value, seen: set[int]) -> int:
    if isinstance(value, torch.Tensor):
        key = (value.data_ptr(), tuple(value.shape))
        if key in seen:
            return 0
        seen.add(key)
        return value.nelement() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    return 0


class _GraphRunner(fx.Interpreter):
    """Walks a traced model node by node over the whole calibration set at once, keeping only the
    values still needed later (the "frontier"), so every layer's input and output can be taken in
    turn at the cost of a single forward pass."""

    def __init__(self, root: nn.Module, graph: fx.Graph, inputs: torch.Tensor) -> None:
        super().__init__(root, garbage_collect_values=True, graph=graph)
        self.env = {}
        self.args_iter = iter([inputs])
        self.nodes = list(graph.nodes)
        self.pos = 0
        self.peak_bytes = 0

    @torch.no_grad()
    def _step(self):
        node = self.nodes[self.pos]
        self.pos += 1
        value = self.env[node] = self.run_node(node)
        live = sum(_tensor_bytes(v, set()) for v in self.env.values())
        self.peak_bytes = max(self.peak_bytes, live)
        for dead in self.user_to_last_uses.get(node, []):
            del self.env[dead]
        return value

    def _find(self, name: str) -> fx.Node:
        while self.pos < len(self.nodes):
            node = self.nodes[self.pos]
            if node.op == "call_module" and node.target == name:
                return node
            self._step()
        raise PTQError(f"layer {name} was not found in the rest of the traced graph (internal order mismatch)")

    def input_of(self, name: str) -> torch.Tensor:
        """Run up to layer ``name`` and return its input, for all samples."""
        args, _ = self.fetch_args_kwargs_from_env(self._find(name))
        return args[0]

    def output_of(self, name: str) -> torch.Tensor:
        """Run up to and including layer ``name`` and return its output, for all samples."""
        self._find(name)
        return self._step()

    def run_all(self) -> None:
        while self.pos < len(self.nodes):
            self._step()


def graph_order(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "call_module"]


def frontier_bytes(model: nn.Module, graph: fx.Graph, example: torch.Tensor) -> int:
    """Peak bytes per sample of the values a :class:`_GraphRunner` keeps alive, measured on ``example``."""
    with _inference(model):
        runner = _GraphRunner(model, graph, example)
        runner.run_all()
    return math.ceil(runner.peak_bytes / example.shape[0])


class _PassSource:
    """Each layer's inputs/outputs from forward passes that stop at the layer (works for any model)."""

    kind = "passes"

    def __init__(self, model, float_model, calib, graph: LayerGraph, device, mode: str) -> None:
        self.model, self.float_model, self.calib = model, float_model, calib
        self.graph, self.device, self.mode = graph, device, mode

    def get(self, name: str, post: PostOp) -> tuple[torch.Tensor, torch.Tensor]:
        calls = self.graph.calls.get(name, 1)
        if self.mode == "parallel":
            return capture(self.float_model, name, self.calib, calls, self.device, post=post, float_mode=True)
        _, y = capture(self.float_model, name, self.calib, calls, self.device, inputs=False, post=post,
                       float_mode=True)
        x, _ = capture(self.model, name, self.calib, calls, self.device)
        return x, y


class _GraphSource:
    """Each layer's inputs/outputs from one walk through the traced graphs (float and quantized side by side)."""

    kind = "graph"

    def __init__(self, model, float_model, calib, model_graph: fx.Graph, float_graph: fx.Graph, device,
                 mode: str) -> None:
        x = calib.to(device)
        self.float_model, self.mode = float_model, mode
        self.float_run = _GraphRunner(float_model, float_graph, x)
        self.quant_run = _GraphRunner(model, model_graph, x) if mode == "sequential" else None

    def get(self, name: str, post: PostOp) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "parallel":
            x = self.float_run.input_of(name)
            return x, post.apply(self.float_run.output_of(name), self.float_model)
        y = post.apply(self.float_run.output_of(name), self.float_model)
        return self.quant_run.input_of(name), y


class _StreamSource:
    """Every layer's data from one float pass and one quantized pass over the calibration set, for models
    torch.fx cannot trace and models with keyword inputs (a Hugging Face transformer).

    The float pass (in mini-batches) keeps each layer's float output (after its post-op) -- and, in
    parallel mode, its float input. In sequential mode the quantized model then runs once over the whole
    calibration set in a single batch, and each layer is calibrated in its forward pre-hook, from the
    input it receives there: the output of the layers before it, already calibrated. Each layer's input
    is computed exactly once (the pass source recomputes the model up to every layer)."""

    kind = "stream"

    def __init__(self, model, float_model, calib, graph: LayerGraph, names: list[str], device, mode: str) -> None:
        self.model, self.float_model, self.calib = model, float_model, calib
        self.names, self.device, self.mode = names, device, mode
        self.post = {n: graph.post.get(n, PostOp()) for n in names}
        self.targets: dict[str, _Buffer] = {}
        self.inputs: dict[str, _Buffer] = {}

    @torch.no_grad()
    def float_pass(self) -> None:
        rows = _rows(self.calib)
        self.targets = {n: _Buffer(rows) for n in self.names}
        self.inputs = {n: _Buffer(rows) for n in self.names} if self.mode == "parallel" else {}

        def hook(name):
            def fn(m, args, out):
                if name in self.inputs:
                    self.inputs[name].add(real_positions(args[0]))
                self.targets[name].add(real_positions(self.post[name].apply(out, self.float_model)))
            return fn

        handles = [self.float_model.get_submodule(n).register_forward_hook(hook(n)) for n in self.names]
        try:
            with _inference(self.float_model, True):
                for x in batches(self.calib, FORWARD_BATCH, self.device):
                    run_model(self.float_model, x)
        finally:
            for h in handles:
                h.remove()

    def run(self, calibrate) -> None:
        """Call ``calibrate(name, x, y)`` for every layer, in execution order."""
        self.float_pass()
        if self.mode == "parallel":
            for name in self.names:
                calibrate(name, self.inputs.pop(name).tensor(), self.targets.pop(name).tensor())
            return
        remaining = set(self.names)

        def pre_hook(name):
            def fn(m, args):
                if name in remaining:
                    remaining.discard(name)
                    calibrate(name, real_positions(args[0]), self.targets.pop(name).tensor())
            return fn

        handles = [self.model.get_submodule(n).register_forward_pre_hook(pre_hook(n)) for n in self.names]
        try:
            with torch.no_grad():
                run_model(self.model, to_device(trim_padding(self.calib), self.device))
        finally:
            for h in handles:
                h.remove()
        if remaining:
            raise PTQError(f"layers {sorted(remaining)[:3]} did not run in the quantized pass over the calibration "
                           f"set; use caching='passes'")


class _LayerProblem:
    """The learnable quantities of one layer and its quantized forward, for AdaQuant."""

    def __init__(self, model: nn.Module, name: str, post: PostOp, x_sample: torch.Tensor) -> None:
        self.model, self.name, self.post = model, name, post
        self.layer = layer = model.get_submodule(name)
        self.w0 = layer.weight.detach().clone()
        self.learn_weight = layer.w_bits != FLOAT_BITS
        wq = layer.weight_quant
        self.w_scale = wq._get(layer.w_bits, "scale") if self.learn_weight else None
        self.w_zero = wq._get(layer.w_bits, "zero_point") if self.learn_weight else None
        if self.learn_weight and self.w_scale is None:
            raise PTQError(f"layer {name} has no calibrated weight range at {layer.w_bits} bits: run init_ranges first")
        self.a_lo, self.a_hi = (layer.input_quant.range_for(layer.a_bits)
                                if layer.a_bits != FLOAT_BITS and not layer.input_quant.dynamic else (None, None))
        if self.a_lo is not None and self.a_lo is layer.input_quant.lo:
            raise PTQError(f"layer {name} has no calibrated input range at {layer.a_bits} bits: run init_ranges first")
        # Weight perturbation in units of each channel's quantization step: one learning rate fits all layers.
        if self.learn_weight:
            step = self.w_scale.detach().reshape(-1)
            self.step = (step if step.numel() > 1 else step.expand(self.w0.shape[0])).reshape(
                (-1,) + (1,) * (self.w0.dim() - 1)).clone()
        else:
            self.step = torch.ones((self.w0.shape[0],) + (1,) * (self.w0.dim() - 1), device=self.w0.device)
        self.v = torch.zeros_like(self.w0, requires_grad=self.learn_weight)
        self.bn_fold = None
        if layer.bias is not None:
            self.bias = layer.bias.detach().clone().requires_grad_(True)
        elif post.bn is not None and getattr(model.get_submodule(post.bn), "running_mean", None) is not None:
            self.bn_fold = model.get_submodule(post.bn)
            self.bias = torch.zeros(self.w0.shape[0], device=self.w0.device, requires_grad=True)
        else:
            self.bias = None
        with torch.no_grad():
            y = self._linear(x_sample, self.w0, layer.bias)
            dims = [d for d in range(y.dim()) if d != 1] if y.dim() > 2 else [0]
            self.out_std = float(y.std(dim=dims).mean()) if y.numel() > 1 else 1.0
        self.saved = [(t, t.detach().clone()) for t in self.range_tensors()]
        self.saved_requires_grad = [t.requires_grad for t in self.range_tensors()]

    def range_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w_scale, self.w_zero, self.a_lo, self.a_hi) if t is not None]

    def param_groups(self, lr_weight: float, lr_bias: float, lr_weight_range: float, lr_act_range: float) -> list[dict]:
        groups = []
        if self.learn_weight and lr_weight > 0:
            groups.append({"params": [self.v], "lr": lr_weight})
        if self.bias is not None and lr_bias > 0:
            groups.append({"params": [self.bias], "lr": lr_bias * max(self.out_std, 1e-8)})
        if self.learn_weight and lr_weight_range > 0:
            groups.append({"params": [self.w_scale], "lr": lr_weight_range * float(self.w_scale.detach().abs().mean())})
            groups.append({"params": [self.w_zero], "lr": lr_weight_range})
        if self.a_lo is not None and lr_act_range > 0:
            a_step = float((self.a_hi.detach() - self.a_lo.detach()).abs()) / (2**self.layer.a_bits - 1)
            groups.append({"params": [self.a_lo, self.a_hi], "lr": lr_act_range * max(a_step, 1e-8)})
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return groups

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def weight(self) -> torch.Tensor:
        return self.w0 + self.v * self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        x_q = layer.input_quant(layer.smooth_input(x), layer.a_bits)
        w_q = layer.quantize_weight(layer.smooth_weight(self.weight()))
        y = self._linear(x_q, w_q, self.bias if self.bn_fold is None else None)
        if self.bn_fold is not None:
            y = y + self.bias.reshape((1, -1) + (1,) * (y.dim() - 2))
        return self.post.apply(y, self.model)

    @torch.no_grad()
    def mse(self, x: torch.Tensor, y: torch.Tensor) -> float:
        total, count = 0.0, 0
        step = FORWARD_BATCH if x.dim() > 2 else 16 * FORWARD_BATCH   # token rows are small
        for start in range(0, x.shape[0], step):
            out = self.forward(x[start:start + step])
            total += float((out - y[start:start + step]).pow(2).sum())
            count += out.numel()
        return total / max(count, 1)

    def learnt(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.bias, *self.range_tensors()) if t is not None]

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in self.learnt()]

    @torch.no_grad()
    def restore(self, state: list[torch.Tensor]) -> None:
        for t, value in zip(self.learnt(), state):
            t.copy_(value)

    @torch.no_grad()
    def commit(self) -> None:
        """Write the learnt weight and bias into the model (ranges were learnt in place)."""
        self.layer.weight.copy_(self.weight())
        if self.bn_fold is not None:
            self.bn_fold.running_mean.sub_(self.bias)
        elif self.bias is not None:
            self.layer.bias.copy_(self.bias)
        self._restore_flags()

    @torch.no_grad()
    def revert(self) -> None:
        """Keep the layer as it was before optimisation."""
        for t, value in self.saved:
            t.copy_(value)
        self._restore_flags()

    def _restore_flags(self) -> None:
        for t, flag in zip(self.range_tensors(), self.saved_requires_grad):
            t.requires_grad_(flag)


def _optimise(problem: _LayerProblem, x: torch.Tensor, y: torch.Tensor, iters: int, batch_size: int,
              lrs: dict[str, float], generator: torch.Generator, val: torch.Tensor | None = None,
              eval_every: int = 10, patience: int = 2) -> dict:
    """Adam on mini-batches of ``(x, y)`` for up to ``iters`` steps. With ``val`` (a boolean mask of held-out
    rows), the other rows are trained on, the held-out error is measured every ``eval_every`` steps, the
    state with the lowest one is kept, and the optimisation stops once it has not improved for
    ``patience`` measurements (the loss stalls, or the layer starts to fit the calibration set's noise)."""
    groups = problem.param_groups(**lrs)
    if not groups or iters == 0:
        return {"steps": 0}
    if val is not None and bool(val.any()) and not bool(val.all()):
        x_val, y_val = x[val], y[val]
        x, y = x[~val], y[~val]
    else:
        val, x_val, y_val = None, None, None
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters)
    n = x.shape[0]
    batch_size = min(batch_size, n)
    order, cursor = torch.randperm(n, generator=generator), 0
    problem.layer.train(False)
    best = problem.mse(x_val, y_val) if val is not None else None
    start_val, best_state, best_step, stale, steps = best, problem.snapshot(), 0, 0, 0
    for step in range(1, iters + 1):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor:cursor + batch_size].to(x.device)
        cursor += batch_size
        loss = F.mse_loss(problem.forward(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        steps = step
        if val is not None and (step % eval_every == 0 or step == iters):
            current = problem.mse(x_val, y_val)
            if current < best * (1 - 1e-4):
                best, best_state, best_step, stale = current, problem.snapshot(), step, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if val is None:
        return {"steps": steps}
    problem.restore(best_state)
    return {"steps": steps, "best_step": best_step, "val_mse_before": start_val, "val_mse_after": best}


def _calibrated_layers(model: nn.Module, graph: LayerGraph, layers: list[str] | None) -> list[str]:
    modules = quant_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in modules]
        if unknown:
            raise PTQError(f"layers {unknown} are not quantizable layers of this model (see anybit.quantizable_layers)")
    wanted = set(modules if layers is None else layers)
    return [n for n in graph.order if n in wanted and isinstance(modules[n], (QuantConv2d, QuantLinear))
            and not modules[n].is_float]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_model(model: nn.Module, keep_first_last: int | None = DEFAULT_KEEP_FIRST_LAST,
                  example: Inputs | None = None) -> nn.Module:
    """Convert a float model in place for PTQ (asymmetric per-channel weights; first and last layers found in
    execution order on ``example`` when given); converted models pass through."""
    check_quantizable(model)
    if not quant_layers(model):
        spec = QuantSpec(**{**PTQ_SPEC.to_dict(), "keep_first_last": keep_first_last})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, spec, example_input=example)
    return model


def _too_large(what: str, need: int, per_sample: float, num_samples: int, max_cache_bytes: int) -> CacheTooLargeError:
    fits = int(max_cache_bytes // max(per_sample, 1))
    return CacheTooLargeError(
        f"AdaQuant would hold {need / 2**20:.0f} MiB {what} ({num_samples} calibration samples), more than "
        f"max_cache_bytes={max_cache_bytes / 2**20:.0f} MiB; use a smaller calibration set (at most {fits} "
        f"samples fit) or raise max_cache_bytes"
    )


def check_cache(graph: LayerGraph, names: list[str], num_samples: int, max_cache_bytes: int) -> dict[str, int]:
    """Bytes AdaQuant caches per layer (its inputs and outputs for the whole calibration set); raises
    :class:`CacheTooLargeError` before any work if the largest does not fit in ``max_cache_bytes``."""
    need = {n: graph.cache_bytes(n, num_samples) * graph.calls.get(n, 1) for n in names}
    worst = max(need, key=need.get) if need else None
    if worst is not None and need[worst] > max_cache_bytes:
        raise _too_large(f"of inputs and outputs for layer {worst}", need[worst], need[worst] / num_samples,
                         num_samples, max_cache_bytes)
    return need


def _stream_bytes(graph: LayerGraph, names: list[str], num: int, mode: str) -> int:
    """Bytes the stream source holds at most: every layer's float outputs (and inputs, in parallel mode)
    for the whole calibration set, plus -- in sequential mode -- a single-batch forward pass over it
    (estimated as four times the largest layer's input and output)."""
    per_sample = sum(graph.out_numel[n] + (graph.in_numel[n] if mode == "parallel" else 0) for n in names)
    if mode == "sequential":
        per_sample += 4 * max((graph.in_numel[n] + graph.out_numel[n] for n in names), default=0)
    return per_sample * num * graph.element_size


def _plan_caching(caching: str, model, float_model, graph: LayerGraph, names: list[str], calib: Inputs,
                  mode: str, need: dict[str, int], max_cache_bytes: int, device):
    """Pick how layer inputs/outputs are produced: one walk through the traced graph (fast, holds the
    live activations of the whole calibration set), one float and one quantized pass with hooks (the
    "stream": any model whose layers run once per forward; holds every layer's float outputs), or
    forward passes per layer (any model, holds one layer's data). Returns ``(kind, float_graph, reason)``."""
    if caching == "passes":
        return "passes", None, "asked for"
    n = count_samples(calib)
    once = all(graph.calls.get(name, 1) == 1 for name in names)
    stream_bytes = _stream_bytes(graph, names, n, mode) if once else None

    def stream_or_passes(reason: str):
        if caching == "graph":
            raise PTQError(f"caching='graph' is not possible: {reason}; use caching='stream', 'passes' or 'auto'")
        if stream_bytes is not None and stream_bytes <= max_cache_bytes:
            return "stream", None, reason
        why = ("a layer is called more than once per forward pass" if stream_bytes is None
               else f"one pass with hooks would hold {stream_bytes / 2**20:.0f} MiB, over max_cache_bytes")
        if caching == "stream":
            if stream_bytes is None:
                raise PTQError(f"caching='stream' is not possible: {why}; use caching='passes' or 'auto'")
            raise _too_large("of layer outputs for one pass with hooks", stream_bytes, stream_bytes / n, n,
                             max_cache_bytes)
        return "passes", None, f"{reason}; {why}"

    if caching == "stream":
        return stream_or_passes("asked for")
    float_graph = None
    if graph.fx_graph is None:
        return stream_or_passes(graph.fx_error and graph.fx_error.startswith("the model takes keyword")
                                and "the model takes keyword inputs" or "the model cannot be traced by torch.fx")
    if not once:
        return stream_or_passes("a layer is called more than once per forward pass")
    try:
        float_graph = trace(float_model)
    except Exception as e:  # noqa: BLE001
        return stream_or_passes(f"the float model cannot be traced ({type(e).__name__})")
    if graph_order(graph.fx_graph) != graph_order(float_graph):
        return stream_or_passes("the float and quantized graphs differ")
    example = take(calib, slice(0, 2)).to(device)
    per_sample = frontier_bytes(float_model, float_graph, example) * (2 if mode == "sequential" else 1)
    total = per_sample * n + max(need.values(), default=0)
    if total > max_cache_bytes:
        if caching == "graph":
            raise _too_large("of live activations for a single pass through the graph", total, total / n, n,
                             max_cache_bytes)
        return stream_or_passes(f"a single pass through the graph would hold {total / 2**20:.0f} MiB, "
                                f"over max_cache_bytes")
    return "graph", float_graph, "traced"


def adaquant(
    model: nn.Module,
    calib_data: CalibData,
    w_bits: int | None = None,
    a_bits: int | None = None,
    *,
    mode: str = "sequential",
    iters: int = DEFAULT_ITERS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr_weight: float | None = None,
    lr_bias: float = DEFAULT_LR_BIAS,
    lr_weight_range: float = DEFAULT_LR_WEIGHT_RANGE,
    lr_act_range: float = DEFAULT_LR_ACT_RANGE,
    init: str = "mse",
    keep_first_last: int | None = DEFAULT_KEEP_FIRST_LAST,
    float_model: nn.Module | None = None,
    layers: list[str] | None = None,
    num_samples: int | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    caching: str = "auto",
    seed: int = 0,
    quiet: bool = True,
    graph: LayerGraph | None = None,
    val_fraction: float | None = None,
    eval_every: int = DEFAULT_EVAL_EVERY,
    patience: int = DEFAULT_PATIENCE,
) -> dict:
    """Calibrate every quantized Conv2d/Linear layer of ``model`` with AdaQuant, in place.

    ``model`` is a float model (converted here, in place, with per-channel asymmetric weights and
    the first/last layers pinned at ``keep_first_last`` bits) or an already converted one.
    ``w_bits``/``a_bits`` set a uniform precision first; ``None`` keeps the model's current
    (possibly per-layer) precision. Layers without calibrated ranges at their precision get them
    from ``init`` (``"mse"`` or ``"minmax"``). ``float_model`` is the reference (default: a float
    copy of ``model`` taken before any change). Learning rates are relative: ``lr_weight`` (``None``:
    3e-2, or 1e-2 for keyword inputs: :func:`default_lr_weight`) and
    ``lr_weight_range`` in weight quantization steps, ``lr_act_range`` in activation steps,
    ``lr_bias`` in output standard deviations, per Adam step. ``caching``: ``"graph"`` walks the
    torch.fx graph once for all layers, ``"passes"`` runs forward passes per layer, ``"auto"`` takes
    the graph walk when the model traces and its live activations fit in ``max_cache_bytes``, else the
    ``"stream"`` (one float and one quantized pass with hooks; models fx cannot trace, keyword inputs),
    else passes. Keyword inputs (a tokenizer's output) are cached as real tokens only: padding enters
    neither the loss nor the error measurements.

    ``val_fraction`` of the calibration samples (seeded; ``None``: 0.2 for keyword inputs, else 0) is held
    out from each layer's optimisation:
    its error is measured every ``eval_every`` steps, the best state is kept, the optimisation stops when
    it has not improved ``patience`` times in a row, and a layer whose held-out error did not drop is
    restored as it was (0 trains on everything and judges on the same data).
    Returns a per-layer report (output MSE before/after, held-out MSE, steps run, post-ops found, time).
    """
    calib = calibration_tensor(calib_data, num_samples, seed)
    if lr_weight is None:
        lr_weight = default_lr_weight(calib)
    if val_fraction is None:
        val_fraction = SEQUENCE_VAL_FRACTION if is_keyword_inputs(calib) else 0.0
    lrs = {"lr_weight": lr_weight, "lr_bias": lr_bias, "lr_weight_range": lr_weight_range, "lr_act_range": lr_act_range}
    check_settings(mode, iters, batch_size, lrs, max_cache_bytes)
    check_early_stopping(val_fraction, eval_every, patience)
    check_method(init)
    if caching not in CACHING:
        raise PTQError(f"caching={caching!r} is unknown: expected one of {list(CACHING)}")
    start = time.perf_counter()
    if float_model is None:
        float_model = float_copy(model)
    device = _device_of(model)
    prepare_model(model, keep_first_last, to_device(take(calib, slice(0, 2)), device))
    if w_bits is not None or a_bits is not None:
        set_precision(model, (FLOAT_BITS if w_bits is None else w_bits, FLOAT_BITS if a_bits is None else a_bits))
    device = _device_of(model)
    float_model.to(device)
    if graph is None:
        graph = analyse(model, to_device(take(calib, slice(0, 2)), device))
    names = _calibrated_layers(model, graph, layers)
    need = check_cache(graph, names, count_samples(calib), max_cache_bytes)
    kind, float_graph, why = _plan_caching(caching, model, float_model, graph, names, calib, mode, need,
                                           max_cache_bytes, device)
    modules = quant_layers(model)
    missing = [n for n in names if not has_ranges(modules[n])]
    if missing:
        init_ranges(model, calib, init, layers=missing, device=device, seed=seed, quiet=quiet)

    generator = torch.Generator().manual_seed(seed)
    val_rows = _validation_rows(calib, val_fraction, seed)
    report: dict[str, dict] = {}
    tick = progress(names, desc=f"AdaQuant ({mode})", quiet=quiet)
    steps = iter(tick)

    def calibrate(name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        next(steps, None)
        post = graph.post.get(name, PostOp())
        problem = _LayerProblem(model, name, post, x[:FORWARD_BATCH])
        before = problem.mse(x, y)
        val = None
        if val_rows is not None and x.shape[0] % val_rows.numel() == 0:   # (repeated: a layer called k times)
            val = val_rows.repeat(x.shape[0] // val_rows.numel())
        rows = max(1, round(batch_size * x.shape[0] / count_samples(calib)))   # batch_size samples, in rows
        with torch.enable_grad():
            fit = _optimise(problem, x, y, iters, rows, lrs, generator, val.to(x.device) if val is not None else None,
                            eval_every, patience)
        after = problem.mse(x, y)
        judged_before, judged_after = ((fit["val_mse_before"], fit["val_mse_after"]) if "val_mse_before" in fit
                                       else (before, after))
        reverted = not judged_after < judged_before
        if reverted:
            problem.revert()
            after = before
        else:
            problem.commit()
        layer = modules[name]
        report[name] = {
            "w_bits": layer.w_bits, "a_bits": layer.a_bits, "post_op": post.describe(),
            "input": "float" if mode == "parallel" else "quantized", "mse_before": before, "mse_after": after,
            "reverted": reverted, "iters": iters, "steps": fit["steps"], "rows": int(x.shape[0]),
            "cache_mib": need[name] / 2**20, "seconds": time.perf_counter() - t0,
            **{k: fit[k] for k in ("best_step", "val_mse_before", "val_mse_after") if k in fit},
        }

    with _inference(model), _inference(float_model, True):
        if kind == "stream":
            _StreamSource(model, float_model, calib, graph, names, device, mode).run(calibrate)
        else:
            if kind == "graph":
                source = _GraphSource(model, float_model, calib, graph.fx_graph, float_graph, device, mode)
            else:
                source = _PassSource(model, float_model, calib, graph, device, mode)
            for name in names:
                x, y = source.get(name, graph.post.get(name, PostOp()))
                calibrate(name, x, y)
                del x, y
            del source
    if hasattr(tick, "close"):
        tick.close()
    return {"mode": mode, "graph": graph.method, "fx_error": graph.fx_error, "caching": kind,
            "caching_reason": why, "samples": count_samples(calib), "val_fraction": val_fraction, "layers": report,
            "seconds": time.perf_counter() - start}


def _validation_rows(calib: Inputs, fraction: float, seed: int) -> torch.Tensor | None:
    """Which cached rows belong to the held-out samples (a seeded random ``fraction`` of them)."""
    n = count_samples(calib)
    held = int(round(fraction * n))
    if fraction <= 0 or held < 1 or held >= n:
        return None
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:held]] = True
    return chosen[_row_samples(calib)]


@torch.no_grad()
def layer_errors(model: nn.Module, float_model: nn.Module, calib: Inputs, graph: LayerGraph,
                 device=None) -> dict[str, float]:
    """Output MSE of every quantized layer against the float layer, both fed the float inputs
    (after their post-ops; real tokens only), in one float pass over ``calib``."""
    modules = quant_layers(model)
    names = [n for n in graph.order if not modules[n].is_float and isinstance(modules[n], (QuantConv2d, QuantLinear))]
    sums = {n: 0.0 for n in names}
    counts = {n: 0 for n in names}

    def hook(name):
        def fn(m, args, out):
            post = graph.post.get(name, PostOp())
            q = real_positions(post.apply(modules[name](args[0]), model))
            ref = real_positions(post.apply(out, float_model))
            sums[name] += float((q - ref).pow(2).sum())
            counts[name] += ref.numel()
        return fn

    handles = [float_model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with _inference(float_model, True), _inference(model):
            for x in batches(calib, FORWARD_BATCH, device):
                run_model(float_model, x)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(counts[n], 1) for n in names}
