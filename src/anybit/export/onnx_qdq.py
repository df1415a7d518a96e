"""ONNX export with QuantizeLinear/DequantizeLinear (QDQ) nodes that ONNX Runtime runs on integer kernels.

The model is traced with ``torch.fx`` (quantizable layers and BatchNorms as leaves) at its current precision
and written node by node:

- a quantizable layer's input goes through ``QuantizeLinear`` → ``DequantizeLinear`` on exactly its
  activation grid (uint8 container; a grid of fewer than 8 bits is enforced by a ``Clip`` on the uint8
  codes, as the fake quantizer clamps them);
- its weight is an int8 (or, with ``int4=True``, int4 where the codes fit) initializer with a per-output-
  channel ``DequantizeLinear``: the layer's own integer codes, with the BatchNorm that follows folded into
  the channel scales and the bias. A channel whose weight is not ``scale * (code - zero_point)`` with an
  integer zero point on any grid the container holds (weight bias correction, DoReFa at 8 bits) gets the
  rest as a per-channel shift added to the dequantized weight: exact (:func:`integer_weights`);
- ONNX Runtime runs a layer on integer kernels when its input is quantized, its weight has no shift and,
  for a convolution, a ``QuantizeLinear`` follows it. Where the output feeds (after an optional ReLU) only
  quantizable layers with one grid, that grid is the next layer's own input quantizer; elsewhere (a
  residual add) an 8-bit requantization of the output is added, aligned with its consumers' grid where
  that grid covers the calibrated range, else on the calibrated min/max, and residual adds of quantized
  tensors are quantized too (``QLinearAdd``). These requantizations are the only places where the ONNX
  model computes something the fake-quantized PyTorch model does not (``requantize=False`` leaves them out).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import ONNX_FORMAT, _atomic_write, read_tagged_json
from ..quant import (
    FLOAT_BITS,
    PRECISION_BN_TYPES,
    QUANT_LAYER_TYPES,
    QuantConv2d,
    QuantLinear,
    QuantMultiheadAttention,
    SwitchableBatchNorm,
)
from ..quant.functional import minmax_scale_zero_point
from .codes import weight_codes
from .errors import ExportError, ExportFileError

FORMAT = ONNX_FORMAT
FORMAT_VERSION = 1
OPSET = 21
ONNX_FILE = "model.onnx"
SIDECAR = "model.json"


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - a pinned dependency
        raise ExportError("ONNX export needs the onnx package (pip install -r requirements.txt)") from e
    return onnx


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, QUANT_LAYER_TYPES + (SwitchableBatchNorm, _BatchNorm)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as an fx graph (its quantizable layers and BatchNorms as leaves), or an ExportError."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, ...)
        raise ExportError(f"ONNX export traces the model with torch.fx, which failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]} (data-dependent control flow cannot be exported)") from e
    return fx.GraphModule(model, graph)


def _bn_statistics(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """(mean, var, the BatchNorm holding eps and the affine terms) a BatchNorm uses right now (eval)."""
    if isinstance(m, SwitchableBatchNorm):
        m = m.bns[m.active]
    if isinstance(m, PRECISION_BN_TYPES):
        mean, var = m.statistics(*m.input_precision())
        return mean.detach().clone(), var.detach().clone(), m
    if m.running_mean is None:
        raise ExportError("a BatchNorm without running statistics (track_running_stats=False) cannot be exported")
    return m.running_mean.detach().clone(), m.running_var.detach().clone(), m


class _Observer(fx.Interpreter):
    """Runs the traced model, recording the BatchNorm statistics it uses and every node's shape and min/max."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.bn: dict[str, tuple] = {}
        self.ranges: dict[str, list[float]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node):
        if n.op == "call_module":
            m = self.module.get_submodule(n.target)
            if isinstance(m, (SwitchableBatchNorm, _BatchNorm)):
                self.bn.setdefault(n.name, _bn_statistics(m))
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
            if out.is_floating_point() and out.numel():
                lo, hi = float(out.min()), float(out.max())
                r = self.ranges.setdefault(n.name, [lo, hi])
                r[0], r[1] = min(r[0], lo), max(r[1], hi)
        return out


@dataclass(frozen=True)
class _Grid:
    scale: float
    zero_point: int
    qmax: int

    @property
    def key(self) -> tuple:
        return (np.float32(self.scale).item(), self.zero_point, self.qmax)

    def covers(self, lo: float, hi: float) -> bool:
        """Whether ``[lo, hi]`` lies within the grid's range (give or take half a step)."""
        step = float(np.float32(self.scale))
        return lo >= -(self.zero_point + 0.5) * step and hi <= (self.qmax - self.zero_point + 0.5) * step


def activation_grid(layer: nn.Module) -> _Grid | None:
    """The input grid of a quantizable layer at its precision (None at 32 bits)."""
    if layer.a_bits == FLOAT_BITS:
        return None
    quant = layer.input_quant
    lo, hi = quant.range_for(layer.a_bits)
    if lo is quant.lo and getattr(quant, "signed", False):
        raise ExportError("a layer's activations use the signed grid (QuantSpec.act_signed, the multi-bit recipe of "
                          "models without BatchNorm), which ONNX export does not write yet; export it with the "
                          "packed format (anybit export --format packed) or at 32-bit activations")
    if lo is quant.lo and not bool(quant.initialized):
        raise ExportError("a layer's activation range is not calibrated at this precision; calibrate it first")
    scale, zp = minmax_scale_zero_point(lo.detach(), hi.detach(), layer.a_bits)
    return _Grid(float(scale), int(zp), 2**layer.a_bits - 1)


EXACT_STEPS = 1e-6   # a residual shift below this share of a weight step is float rounding, not a shift


def integer_weights(codes: torch.Tensor, qmin: int, qmax: int, a: np.ndarray, b: np.ndarray,
                    container: tuple[int, int] = (-128, 127)) -> dict:
    """Per output channel, integer codes ``c`` (in ``container``), a scale ``s``, an integer zero point ``z``
    and a shift ``r`` with ``s * (c - z) + r == a * q + b`` in exact arithmetic for the layer's codes ``q``.

    Where ``-b / a`` is an integer on a grid ``M`` times finer that the container holds (symmetric,
    asymmetric and calibrated grids; DoReFa's half-integer zero point on even ``M``) the shift is 0; the
    largest such ``M`` is taken, so that the accumulator step an integer kernel rounds its bias to,
    ``input scale * s``, is as fine as the container allows. Otherwise (weight bias correction, 8-bit
    DoReFa) ``z`` is the nearest integer and ``r`` the rest, added to the dequantized weight.
    ``max_error_steps`` checks the representation.
    """
    lo_c, hi_c = container
    q = codes.reshape(codes.shape[0], -1).numpy().astype(np.int64)
    channels = q.shape[0]
    out_c = np.zeros_like(q)
    scale = np.ones(channels)
    zp = np.zeros(channels, dtype=np.int64)
    shift = np.zeros(channels)
    multiple = np.ones(channels, dtype=np.int64)
    span = qmax - qmin
    if span > hi_c - lo_c:
        raise ValueError(f"{span + 1} levels do not fit an integer container of {hi_c - lo_c + 1}")
    m_max = max((hi_c - lo_c) // span if span else 1, 1)
    for c in range(channels):
        if a[c] == 0:   # every weight of the channel equal: the shift alone
            shift[c] = b[c]
            continue
        sign = 1 if a[c] > 0 else -1
        size = abs(a[c])
        qs = sign * q[c]
        q_lo, q_hi = (qmin, qmax) if sign > 0 else (-qmax, -qmin)
        z_real = -b[c] / size
        chosen = None
        for m in range(m_max, 0, -1):   # the finest grid: an integer kernel's int32 bias is rounded to its step
            zm = round(m * z_real)
            if abs(zm - m * z_real) <= EXACT_STEPS * m:
                o_lo, o_hi = max(m * q_hi - hi_c, zm - hi_c), min(m * q_lo - lo_c, zm - lo_c)
                if o_lo <= o_hi:
                    chosen = (m, zm, o_lo)
                    break
        if chosen is None:   # no exact integer zero point: the nearest one, and the rest as a shift
            o_lo, o_hi = q_hi - hi_c, q_lo - lo_c
            zm = int(np.clip(round(z_real), o_lo + lo_c, o_hi + hi_c))
            chosen = (1, zm, max(o_lo, zm - hi_c))
            shift[c] = b[c] + size * zm
        m, zm, o = chosen
        out_c[c] = m * qs - o
        zp[c] = zm - o
        scale[c] = size / m
        multiple[c] = m
    scale32 = scale.astype(np.float32)
    got = scale32.astype(np.float64)[:, None] * (out_c - zp[:, None]) + shift.astype(np.float32)[:, None]
    target = a[:, None] * q + b[:, None]
    # a channel whose weights are all equal (a == 0) has no step: its shift's float32 rounding is measured
    # against the value itself
    step = np.where(a != 0, np.abs(a), np.maximum(np.abs(b), 1e-30))[:, None]
    error_steps = float(np.max(np.abs(got - target) / step)) if q.size else 0.0
    return {"codes": out_c.reshape(codes.shape), "scale": scale32, "zero_point": zp, "multiple": multiple,
            "shift": shift, "max_error_steps": error_steps}


class _Builder:
    """Accumulates ONNX nodes and initializers."""

    def __init__(self) -> None:
        self.onnx = _onnx()
        self.nodes, self.inits, self._count, self._q_cache = [], [], 0, {}
        self.grids: dict[str, _Grid] = {}   # DequantizeLinear outputs: the grid they hold

    def name(self, base: str) -> str:
        self._count += 1
        return f"{base.replace('.', '_')}_{self._count}"

    def const(self, base: str, array: np.ndarray, dtype=None) -> str:
        from onnx import helper, numpy_helper

        name = self.name(base)
        if dtype is not None:   # int4: the helper packs the values
            self.inits.append(helper.make_tensor(name, dtype, array.shape, array.reshape(-1).tolist()))
        else:
            # np.ascontiguousarray would make a 0-d scale 1-d: per-tensor terms must stay scalars
            self.inits.append(numpy_helper.from_array(np.array(array, copy=True, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_" + op, **attrs))
        return out

    def quantize(self, x: str, grid: _Grid, base: str) -> str:
        """``x`` through its activation grid: Q → (Clip on the codes) → DQ; one chain per tensor and grid, none
        for a tensor that already holds that grid's values."""
        if x in self.grids and self.grids[x].key == grid.key:
            return x
        key = (x, grid.key)
        if key not in self._q_cache:
            s = self.const(base + "_scale", np.array(grid.scale, dtype=np.float32))
            z = self.const(base + "_zp", np.array(grid.zero_point, dtype=np.uint8))
            q = self.node("QuantizeLinear", [x, s, z], base + "_q")
            if grid.qmax < 255:
                lo = self.const(base + "_qmin", np.array(0, dtype=np.uint8))
                hi = self.const(base + "_qmax", np.array(grid.qmax, dtype=np.uint8))
                q = self.node("Clip", [q, lo, hi], base + "_qclip")
            self._q_cache[key] = self.node("DequantizeLinear", [q, s, z], base + "_dq")
            self.grids[self._q_cache[key]] = grid
        return self._q_cache[key]


_RELU = {F.relu, torch.relu, torch.relu_, F.relu_}
_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), nn.ReLU)
    if n.op == "call_function":
        return n.target in _RELU
    return n.op == "call_method" and n.target in ("relu", "relu_")


def _quant_layer(gm: fx.GraphModule, n: fx.Node) -> nn.Module | None:
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, (QuantConv2d, QuantLinear)) or type(m) in (nn.Conv2d, nn.Linear):
            return m
    return None


def _consumer_grid(gm: fx.GraphModule, n: fx.Node) -> _Grid | None:
    """The one activation grid every consumer of ``n`` (through ReLUs, zero point 0) quantizes it to."""
    grids = set()
    for user in n.users:
        layer = _quant_layer(gm, user)
        if layer is not None and isinstance(layer, QUANT_LAYER_TYPES) and user.args[0] is n:
            grid = activation_grid(layer)
            if grid is None:
                return None
            grids.add(grid)
        elif _is_relu(gm, user):
            inner = _consumer_grid(gm, user)
            if inner is None or inner.zero_point != 0:
                return None
            grids.add(inner)
        else:
            return None
    return grids.pop() if len(grids) == 1 else None


def _is_add(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _ADD


def _requant_point(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """Where the output of ``n`` is requantized: after the ReLU that is its only consumer (a finer grid,
    and ONNX Runtime drops the ReLU into the quantization), else at ``n``."""
    users = list(n.users)
    return users[0] if len(users) == 1 and _is_relu(gm, users[0]) else n


def _aligned_grid(grid: _Grid, lo: float, hi: float) -> _Grid | None:
    """The finest 8-bit grid ``k`` times finer than ``grid`` (``k`` odd, zero points aligned) that covers
    ``[lo, hi]``: a value rounded to it and then to ``grid`` lands where rounding it to ``grid`` directly
    would (``round(round(k t) / k) == round(t)`` for odd ``k``), so the consumer sees what it would have."""
    step = float(np.float32(grid.scale))
    for k in range(255 // max(grid.qmax, 1) | 1, 0, -2):
        fine = _Grid(step / k, grid.zero_point * k, 255)
        if fine.zero_point <= 255 and fine.covers(lo, hi):
            return fine
    return None


def _requant_grid(gm: fx.GraphModule, n: fx.Node, observer: "_Observer") -> _Grid:
    """The 8-bit grid a requantized tensor gets: aligned with the one input grid of the layers that consume it
    where such a grid covers the tensor's calibrated range (those layers then see exactly the values they
    would have, and no second quantization runs before them), else the tensor's calibrated min/max."""
    lo, hi = observer.ranges[n.name]
    grids = {activation_grid(_quant_layer(gm, u)) for u in n.users
             if _quant_layer(gm, u) is not None and isinstance(_quant_layer(gm, u), QUANT_LAYER_TYPES)
             and u.args[0] is n}
    if len(grids) == 1 and None not in grids:
        aligned = _aligned_grid(grids.pop(), lo, hi)
        if aligned is not None:
            return aligned
    scale, zp = minmax_scale_zero_point(torch.tensor(lo), torch.tensor(hi), 8)
    return _Grid(float(scale), int(zp), 255)


def _pads(padding, dims: int) -> list[int]:
    if isinstance(padding, str):
        if padding == "valid":
            return [0] * (2 * dims)
        raise ExportError(f"convolution padding {padding!r} is not exported; use integer padding")
    padding = list(padding) if isinstance(padding, (tuple, list)) else [padding] * dims
    return padding + padding


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                calib_data: Iterable | torch.Tensor | None = None, int4: bool = False,
                metadata: dict | None = None, requantize: bool = True) -> dict:
    """Write ``model`` at its current precision as a QDQ ONNX graph (``DIR/model.onnx`` + ``DIR/model.json``).

    ``calib_data`` (a tensor, or batches of ``(x, y)`` or ``x``; default: ``example_input``) sets the ranges
    of the output requantizations ONNX Runtime's integer convolutions need (see the module docstring).
    ``requantize=False`` leaves those out: every layer whose output is not quantized by its consumers then
    runs as a float convolution, and the graph computes exactly what the PyTorch model does.
    ``int4``: weights whose codes fit in 4 bits are stored as ONNX ``INT4``. Returns a summary.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper

    model.eval()
    for name, m in model.named_modules():
        if isinstance(m, QuantMultiheadAttention):
            raise ExportError(f"layer {name!r} is a MultiheadAttention; ONNX export supports convolutions and "
                              f"linear layers (export it with --format packed)")
    gm = trace(model)
    fold = _fold_pairs(gm)
    observer = _Observer(gm)
    with torch.no_grad():
        observer.run(example_input)
        for batch in _batches(calib_data) if calib_data is not None and requantize else []:
            observer.run(batch.to(example_input.device))

    plans = {n.name: _plan_layer(gm, n, observer.bn.get(fold[n].name) if n in fold else None, int4)
             for n in gm.graph.nodes if _quant_layer(gm, n) is not None}
    # where an integer layer's output is not quantized by its consumers (a residual add), ONNX Runtime needs a
    # QuantizeLinear after it to run it on integer kernels: planned here, residual adds are decided on the way
    after: dict[str, _Grid] = {}
    if requantize:
        for n in gm.graph.nodes:
            plan = plans.get(n.name)
            if plan is None or not plan["integer"]:
                continue
            out = fold.get(n, n)
            if _consumer_grid(gm, out) is None and any(u.op != "output" for u in out.users):
                point = _requant_point(gm, out)
                after[point.name] = _requant_grid(gm, point, observer)
    for n in gm.graph.nodes:   # an integer convolution needs a quantized output (QGemm also gives float ones)
        plan = plans.get(n.name)
        if plan is not None and plan["integer"] and isinstance(plan["layer"], nn.Conv2d):
            out = fold.get(n, n)
            if _consumer_grid(gm, out) is None and _requant_point(gm, out).name not in after:
                plan["integer"] = False
                plan["info"]["kernel"] = "float"

    b = _Builder()
    names: dict[str, str] = {}
    report: dict[str, dict] = {}
    requantized: list[str] = []
    graph_input = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if graph_input is not None:
                raise ExportError("ONNX export supports models with one input tensor")
            graph_input = "input"
            names[n.name] = graph_input
        elif n.op == "output":
            result = n.args[0]
            if not isinstance(result, fx.Node):
                raise ExportError("ONNX export supports models that return one tensor (the logits)")
            b.nodes.append(helper.make_node("Identity", [names[result.name]], ["logits"], name="logits_Identity"))
            out_shape = observer.shapes[result.name]
        elif n.op == "get_attr":
            raise ExportError(f"ONNX export does not support reading the model's attribute {n.target!r} in forward")
        elif n.name in plans:
            out = _emit_layer(b, gm, n, names[n.args[0].name], plans[n.name], report)
            names[n.name] = out
            if n in fold:
                names[fold[n].name] = out
        elif n.name in names:   # a BatchNorm folded into its layer
            continue
        else:
            names[n.name] = _emit_op(b, gm, n, names, observer)
            if requantize and _is_add(n) and len(n.args) == 2 and \
                    all(isinstance(a, fx.Node) and names[a.name] in b.grids for a in n.args):
                # a residual add of quantized tensors: its output quantized too, so that ONNX Runtime adds integers
                point = _requant_point(gm, n)
                after[point.name] = _requant_grid(gm, point, observer)
        for done in (n, fold.get(n)):
            if done is not None and done.name in after:
                names[done.name] = b.quantize(names[done.name], after[done.name], done.name + "_requant")
                requantized.append(done.name)

    if graph_input is None:
        raise ExportError("the traced model has no input")
    shape = ["batch", *example_input.shape[1:]]
    graph = helper.make_graph(
        b.nodes, "anybit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", *out_shape[1:]])],
        b.inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="anybit")
    onnx_model.ir_version = 10
    try:
        onnx.checker.check_model(onnx_model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"internal error: the ONNX graph does not validate ({str(e).splitlines()[0]}); "
                          f"please report it") from e
    data = onnx_model.SerializeToString()
    directory = Path(path)
    sidecar = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "file": ONNX_FILE, "opset": OPSET,
        "sha256": hashlib.sha256(data).hexdigest(), "input_shape": list(example_input.shape[1:]),
        "model": {k: v for k, v in (getattr(model, "anybit_meta", {}) or {}).items()
                  if k in ("arch", "arch_kwargs", "quant_spec")},
        "requantized": requantized, "layers": report, "metadata": metadata or {},
    }
    _atomic_write(directory / ONNX_FILE, lambda tmp: Path(tmp).write_bytes(data))
    _atomic_write(directory / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    return {"file_bytes": len(data), "requantized": len(requantized), "layers": report}


def _batches(data):
    if isinstance(data, torch.Tensor):
        yield data
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _fold_pairs(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """Layer node → the BatchNorm node folded into it (the layer's only consumer)."""
    pairs = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (SwitchableBatchNorm, _BatchNorm)):
            src = n.args[0]
            if isinstance(src, fx.Node) and _quant_layer(gm, src) is not None and len(src.users) == 1:
                if isinstance(_quant_layer(gm, src), (nn.Conv2d,)) or _is_bn_1d(gm.get_submodule(n.target)):
                    pairs[src] = n
    return pairs


def _is_bn_1d(m: nn.Module) -> bool:
    if isinstance(m, SwitchableBatchNorm):
        m = next(iter(m.bns.values()))
    return isinstance(m, nn.BatchNorm1d)


def _plan_layer(gm: fx.GraphModule, n: fx.Node, bn, int4: bool) -> dict:
    """How a (quantizable or plain) convolution or linear layer is written: its input grid, its weight as
    integer codes (with the BatchNorm after it folded in) or floats, its bias, and whether ONNX Runtime can
    run it on integer kernels (a quantized input, and integer weights without a shift)."""
    from onnx import TensorProto

    layer = _quant_layer(gm, n)
    name = n.target
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        raise ExportError(f"layer {name!r}: padding_mode {layer.padding_mode!r} is not exported")
    quantized = isinstance(layer, QUANT_LAYER_TYPES)
    w_bits = layer.w_bits if quantized else FLOAT_BITS
    grid = activation_grid(layer) if quantized else None
    weight = layer.weight.detach().to(torch.float64)
    channels = weight.shape[0]
    factor = np.ones(channels)
    bias = layer.bias.detach().to(torch.float64).numpy() if layer.bias is not None else np.zeros(channels)
    if bn is not None:
        mean, var, module = bn
        inv = 1.0 / np.sqrt(var.to(torch.float64).numpy() + module.eps)
        gamma = module.weight.detach().to(torch.float64).numpy() if module.weight is not None else np.ones(channels)
        beta = module.bias.detach().to(torch.float64).numpy() if module.bias is not None else np.zeros(channels)
        factor = gamma * inv
        bias = (bias - mean.to(torch.float64).numpy()) * factor + beta
    plan = {"layer": layer, "grid": grid, "bias": bias, "rep": None, "dtype": None,
            "info": {"w_bits": w_bits, "a_bits": layer.a_bits if quantized else FLOAT_BITS}}
    if w_bits == FLOAT_BITS:
        shape = (-1,) + (1,) * (weight.dim() - 1)
        plan["float_weight"] = weight.numpy() * factor.reshape(shape)
        plan["integer"] = False
        plan["info"]["kernel"] = "float"
        return plan
    codes = weight_codes(layer, "weight", w_bits, where=f"layer {name!r}")
    a, c0 = (t.numpy() for t in codes.channel_affine())
    a, c0 = a * factor, c0 * factor
    rep = None
    if int4 and codes.qmax - codes.qmin <= 15:
        rep = integer_weights(codes.codes, codes.qmin, codes.qmax, a, c0, (-8, 7))
        plan["dtype"] = TensorProto.INT4
    rep = rep or integer_weights(codes.codes, codes.qmin, codes.qmax, a, c0)
    if rep["max_error_steps"] > 1e-3:
        raise ExportError(f"internal error: layer {name!r}'s integer weights differ from its weights by "
                          f"{rep['max_error_steps']:.3g} of a step; please report it")
    shifted = bool(np.any(rep["shift"] != 0))
    plan["rep"] = rep
    plan["integer"] = grid is not None and not shifted and plan["dtype"] is None
    plan["info"].update({"weight_type": "int4" if plan["dtype"] is not None else "int8", "weight_shift": shifted,
                         "kernel": "integer" if plan["integer"] else "float",
                         "max_weight_error_steps": rep["max_error_steps"], "multiple": int(rep["multiple"].max())})
    return plan


def _emit_layer(b: _Builder, gm: fx.GraphModule, n: fx.Node, x: str, plan: dict, report: dict) -> str:
    """The layer's nodes: input quantization, weight (DequantizeLinear of integer codes, plus the per-channel
    shift ``r`` weight bias correction leaves), bias, and the convolution or Gemm."""
    layer, grid, bias, rep = plan["layer"], plan["grid"], plan["bias"], plan["rep"]
    name = n.target
    if grid is not None:
        x = b.quantize(x, grid, name + "_in")
    elif isinstance(layer, QUANT_LAYER_TYPES) and not layer.runs_float_forward \
            and getattr(layer.input_quant, "clip_float", False) \
            and (layer.input_quant.mode == "fixed" or bool(layer.input_quant.initialized)):
        lo = b.const(name + "_clip_lo", np.array(float(layer.input_quant._shared_lo()), dtype=np.float32))
        hi = b.const(name + "_clip_hi", np.array(float(layer.input_quant.hi), dtype=np.float32))
        x = b.node("Clip", [x, lo, hi], name + "_clip")

    if rep is not None:
        w_q = b.const(name + "_w", rep["codes"].astype(np.int8), plan["dtype"])
        w_s = b.const(name + "_w_scale", rep["scale"])
        w_z = b.const(name + "_w_zp", rep["zero_point"].astype(np.int8), plan["dtype"])
        w = b.node("DequantizeLinear", [w_q, w_s, w_z], name + "_w_dq", axis=0)
        if plan["integer"]:   # ONNX Runtime's integer kernels take an int32 bias on the accumulator's scale
            bias_scale = (np.float32(grid.scale) * rep["scale"]).astype(np.float32)
            q_bias = np.round(bias / bias_scale.astype(np.float64))
            bq = b.const(name + "_b", np.clip(q_bias, -2**31, 2**31 - 1).astype(np.int32))
            bs = b.const(name + "_b_scale", bias_scale)
            bias_name = b.node("DequantizeLinear", [bq, bs], name + "_b_dq", axis=0)
        else:
            bias_name = b.const(name + "_b", bias.astype(np.float32))
    else:
        w = b.const(name + "_w", plan["float_weight"].astype(np.float32))
        bias_name = b.const(name + "_b", bias.astype(np.float32))
    report[name] = plan["info"]

    if rep is not None and plan["info"]["weight_shift"]:   # weight bias correction: W = s * (c - z) + r, exactly
        shape = (-1,) + (1,) * (rep["codes"].ndim - 1)
        shift = b.const(name + "_w_shift", rep["shift"].astype(np.float32).reshape(shape))
        w = b.node("Add", [w, shift], name + "_w_plus_shift")
    if isinstance(layer, nn.Conv2d):
        return b.node("Conv", [x, w, bias_name], name, kernel_shape=list(layer.kernel_size), group=layer.groups,
                      strides=list(layer.stride), pads=_pads(layer.padding, 2), dilations=list(layer.dilation))
    return b.node("Gemm", [x, w, bias_name], name, transB=1)


def _emit_op(b: _Builder, gm: fx.GraphModule, n: fx.Node, names: dict[str, str], observer: _Observer) -> str:
    def arg(i):
        a = n.args[i]
        if not isinstance(a, fx.Node):
            raise ExportError(f"node {n.name}: argument {i} is a constant ({a!r}); not exported")
        return names[a.name]

    where = f"{n.op} {n.target!r}" if n.op != "call_module" else f"module {n.target!r}"
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        if isinstance(m, nn.ReLU):
            return b.node("Relu", [arg(0)], n.target)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return arg(0)
        if isinstance(m, nn.ReLU6):
            lo, hi = b.const("relu6_lo", np.array(0, np.float32)), b.const("relu6_hi", np.array(6, np.float32))
            return b.node("Clip", [arg(0), lo, hi], n.target)
        if isinstance(m, nn.MaxPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
            d = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,) * 2
            return b.node("MaxPool", [arg(0)], n.target, kernel_shape=list(k), strides=list(s),
                          pads=_pads(m.padding, 2), dilations=list(d), ceil_mode=int(m.ceil_mode))
        if isinstance(m, nn.AvgPool2d):
            k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            s = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
            return b.node("AveragePool", [arg(0)], n.target, kernel_shape=list(k), strides=list(s),
                          pads=_pads(m.padding, 2), ceil_mode=int(m.ceil_mode),
                          count_include_pad=int(m.count_include_pad))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            if tuple(size) != (1, 1):
                raise ExportError(f"{where}: adaptive average pooling to {size} is not exported (only to 1x1)")
            return b.node("GlobalAveragePool", [arg(0)], n.target)
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ExportError(f"{where}: Flatten({m.start_dim}, {m.end_dim}) is not exported (only from dim 1)")
            return b.node("Flatten", [arg(0)], n.target, axis=1)
        if isinstance(m, (SwitchableBatchNorm, _BatchNorm)):
            mean, var, module = observer.bn[n.name]
            channels = mean.numel()
            gamma = module.weight.detach() if module.weight is not None else torch.ones(channels)
            beta = module.bias.detach() if module.bias is not None else torch.zeros(channels)
            ins = [arg(0)] + [b.const(f"{n.target}_{k}", v.float().numpy())
                              for k, v in (("scale", gamma), ("bias", beta), ("mean", mean), ("var", var))]
            return b.node("BatchNormalization", ins, n.target, epsilon=float(module.eps))
        raise ExportError(f"ONNX export does not support {type(m).__name__} ({where}); supported: quantizable and "
                          f"plain Conv2d/Linear, BatchNorm, ReLU, ReLU6, pooling, Flatten, add, mul, cat, flatten")
    if n.op == "call_function" and n.target in _ADD | _MUL:
        op = "Add" if n.target in _ADD else "Mul"
        ins = []
        for a in n.args[:2]:
            if isinstance(a, fx.Node):
                ins.append(names[a.name])
            elif isinstance(a, (int, float)):
                ins.append(b.const("scalar", np.array(a, dtype=np.float32)))
            else:
                raise ExportError(f"node {n.name}: {op} of {type(a).__name__} is not exported")
        return b.node(op, ins, n.name)
    if _is_relu(gm, n):
        return b.node("Relu", [arg(0)], n.name)
    flatten = (n.op == "call_function" and n.target is torch.flatten) or (n.op == "call_method" and n.target == "flatten")
    if flatten:
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        rank = len(observer.shapes[n.args[0].name])
        if end not in (-1, rank - 1) or start not in (1, 1 - rank) and not (start == 0 and rank == 1):
            raise ExportError(f"node {n.name}: flatten({start}, {end}) is not exported (only from dim 1)")
        return b.node("Flatten", [arg(0)], n.name, axis=1)
    if n.op == "call_function" and n.target is torch.cat:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return b.node("Concat", [names[t.name] for t in tensors], n.name, axis=int(dim))
    raise ExportError(f"ONNX export does not support {where} (node {n.name}); supported: quantizable and plain "
                      f"Conv2d/Linear, BatchNorm, ReLU, ReLU6, pooling, Flatten, add, mul, cat, flatten")


# ---------------------------------------------------------------------------------------------- running
def onnx_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(model.onnx, model.json)`` for an export directory or either file."""
    p = Path(path)
    if p.is_dir():
        return p / ONNX_FILE, p / SIDECAR
    if p.suffix == ".json":
        return p.with_name(ONNX_FILE) if p.name == SIDECAR else p.with_suffix(".onnx"), p
    return p, p.with_name(SIDECAR) if p.name == ONNX_FILE else p.with_suffix(".json")


def read_onnx_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of an ONNX export (``{}`` for a bare .onnx file without one)."""
    onnx_file, sidecar = onnx_paths(path)
    if not onnx_file.is_file():
        raise ExportFileError(f"no ONNX export at {path}: missing {onnx_file} (anybit export --format onnx writes "
                              f"DIR/model.onnx and DIR/model.json)")
    if not sidecar.is_file():
        return {}
    data = read_tagged_json(sidecar, FORMAT, ExportFileError, "an anybit ONNX export sidecar", "export")
    for field in ("metadata", "model"):
        if not isinstance(data.get(field, {}), dict):
            raise ExportFileError(f"{sidecar} is corrupt: '{field}' must be an object; export it again")
    return data


class OnnxSession:
    """An ONNX Runtime session on the CPU, called like a model: ``logits = session(images)``."""

    def __init__(self, session, sidecar: dict) -> None:
        self.session = session
        self.sidecar = sidecar
        self.input_name = session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(x.detach().cpu().numpy()))


def onnx_session(path: str | os.PathLike, threads: int | None = None,
                 config: dict[str, str] | None = None) -> OnnxSession:
    """Open an exported ONNX file (its directory or the file) in ONNX Runtime with all graph optimisations
    (the QDQ fusions into integer kernels; switched off when the sidecar lists no layer that runs on them,
    so that the weights are dequantized once); ``threads``: intra-op threads (default: ONNX Runtime's);
    ``config``: further session configuration entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``).
    A file whose checksum does not match its sidecar, or that ONNX Runtime cannot read, is an
    :class:`ExportFileError`."""
    import onnxruntime as ort

    sidecar = read_onnx_sidecar(path)
    onnx_file, _ = onnx_paths(path)
    data = onnx_file.read_bytes()
    if sidecar.get("sha256") and hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        raise ExportFileError(f"{onnx_file} is corrupt or truncated: its checksum does not match the sidecar's "
                              f"({len(data)} bytes); export it again")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    layers = sidecar.get("layers", {})
    if layers and not any(isinstance(v, dict) and v.get("kernel") == "integer" for v in layers.values()):
        # nothing runs on integer kernels (weight bias correction throughout): without the QDQ fusions ONNX
        # Runtime dequantizes the weights once, at load, and runs its fastest float convolutions
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportFileError(f"{onnx_file} could not be opened by ONNX Runtime ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the file is corrupt or not an ONNX model") from e
    return OnnxSession(session, sidecar)


@torch.no_grad()
def with_onnx_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (at its precision) whose quantized weights are rebuilt from what the ONNX export
    writes (int8 codes, per-channel scale and zero point, and the shift of weight bias correction; before
    BatchNorm folding), frozen: its accuracy against ``model``'s measures what the representation changes
    (float rounding only)."""
    import copy

    from ..quant import quant_layers

    twin = copy.deepcopy(model)
    for name, layer in quant_layers(twin).items():
        if isinstance(layer, QuantMultiheadAttention) or layer.w_bits == FLOAT_BITS:
            continue
        codes = weight_codes(layer, "weight", layer.w_bits, where=f"layer {name!r}")
        a, b = (t.numpy() for t in codes.channel_affine())
        rep = integer_weights(codes.codes, codes.qmin, codes.qmax, a, b)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        w = rep["scale"].astype(np.float64).reshape(shape) * (rep["codes"] - rep["zero_point"].reshape(shape)) \
            + rep["shift"].astype(np.float32).astype(np.float64).reshape(shape)
        layer.weight.data = torch.from_numpy(w).to(layer.weight.dtype)
        layer.frozen_bits = layer.w_bits
    return twin
