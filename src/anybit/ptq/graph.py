"""What follows each quantized layer, read from the model graph (never from layer names).

AdaQuant compares a layer's output with the float one *after* the BatchNorm and ReLU that
consume it, when they do. Two ways to find them:

* ``torch.fx`` symbolic tracing (quantized layers and BatchNorms as leaves): a layer whose only
  user is a BatchNorm module, whose only user is a ReLU (``nn.ReLU`` module of any name,
  ``F.relu``, ``torch.relu``, ``.relu()``, in-place or not), or a layer whose only user is a ReLU.
* a fallback for models fx cannot trace (data-dependent control flow): one probe forward pass with
  module hooks and a ``TorchFunctionMode`` that records every torch function called and the
  tensors it consumed, so the consumers of each layer's output are observed directly.

A layer whose output has several consumers (a residual branch, for example) gets no post-op.
The probe pass also gives the execution order, calls per forward and per-sample tensor sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..inputs import Inputs, is_keyword_inputs, num_samples, run_model
from ..quant import FLOAT_BITS, QUANT_LAYER_TYPES, precision, quant_layers

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}
_RELU_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class PostOp:
    """The BatchNorm module (by name) and/or ReLU applied to a layer's output before the comparison."""

    bn: str | None = None
    relu: bool = False

    def describe(self) -> str:
        parts = ([self.bn] if self.bn else []) + (["relu"] if self.relu else [])
        return " + ".join(parts) or "none"

    def apply(self, y: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """``relu(bn(y))`` with the model's BatchNorm in inference mode (its statistics frozen; batch
        statistics for a BatchNorm that keeps none)."""
        if self.bn is not None:
            bn = model.get_submodule(self.bn)
            batch_stats = bn.running_mean is None  # track_running_stats=False: BN always uses batch statistics
            y = F.batch_norm(y, bn.running_mean, bn.running_var,
                             None if bn.weight is None else bn.weight.detach(),
                             None if bn.bias is None else bn.bias.detach(), batch_stats, 0.0, bn.eps)
        return F.relu(y) if self.relu else y


@dataclass
class LayerGraph:
    """Quantized layers in execution order, with their post-ops and per-sample input/output sizes."""

    order: list[str]
    calls: dict[str, int]
    post: dict[str, PostOp]
    method: str
    in_numel: dict[str, int] = field(default_factory=dict)
    out_numel: dict[str, int] = field(default_factory=dict)
    element_size: int = 4
    fx_error: str | None = None
    fx_graph: fx.Graph | None = None

    def cache_bytes(self, name: str, num_samples: int) -> int:
        """Bytes to hold a layer's inputs and (post-op) outputs for ``num_samples`` samples."""
        return num_samples * (self.in_numel[name] + self.out_numel[name]) * self.element_size


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Recorder(TorchFunctionMode):
    """Records each top-level torch function call that returns tensors, with the tensors it read."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, list[torch.Tensor], list[torch.Tensor]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = _tensors(out)
        if outputs:
            self.calls.append((func, _tensors((args, kwargs or {})), outputs))
        return out


def _combine(posts: list[PostOp]) -> PostOp:
    return posts[0] if posts and all(p == posts[0] for p in posts) else PostOp()


def _hook_post_ops(layer_outputs: dict[str, list[torch.Tensor]], bn_io: list[tuple[str, torch.Tensor, torch.Tensor]],
                   calls: list[tuple[object, list[torch.Tensor], list[torch.Tensor]]]) -> dict[str, PostOp]:
    def consumers(t) -> list:
        """Functions that read the value ``t`` holds when it is produced, in call order. An in-place
        op (one that returns ``t`` itself) is the last reader of that value: later readers see its result."""
        start = next((i for i, (_, _, outs) in enumerate(calls) if any(o is t for o in outs)), None)
        if start is None:
            return []
        found = []
        for func, inputs, outputs in calls[start + 1:]:
            if any(i is t for i in inputs):
                found.append(func)
                if any(o is t for o in outputs):
                    break
        return found

    def follow(t) -> PostOp:
        funcs = consumers(t)
        if len(funcs) != 1:
            return PostOp()
        if funcs[0] in _RELU_FUNCTIONS:
            return PostOp(None, True)
        for bn_name, bn_in, bn_out in bn_io:
            if bn_in is t:
                after = consumers(bn_out)
                return PostOp(bn_name, len(after) == 1 and after[0] in _RELU_FUNCTIONS)
        return PostOp()

    return {name: _combine([follow(t) for t in outs]) for name, outs in layer_outputs.items()}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, QUANT_LAYER_TYPES) or isinstance(m, _BatchNorm):
            return True
        if any(isinstance(c, QUANT_LAYER_TYPES) for c in m.modules()):
            return False
        return super().is_leaf_module(m, qualname)


def _is_relu_node(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def trace(model: nn.Module) -> fx.Graph:
    """``torch.fx`` graph of ``model`` with quantized layers and BatchNorms as leaves (raises if untraceable)."""
    return _Tracer().trace(model)


def fx_post_ops(model: nn.Module, names: list[str], graph: fx.Graph | None = None) -> dict[str, PostOp]:
    """Post-ops from a ``torch.fx`` trace; raises if the model cannot be traced or a layer is not in the graph."""
    graph = graph if graph is not None else trace(model)
    nodes: dict[str, list[fx.Node]] = {n: [] for n in names}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in nodes:
            nodes[node.target].append(node)
    missing = [n for n, found in nodes.items() if not found]
    if missing:
        raise RuntimeError(f"layers not in the fx graph: {missing[:5]}")

    def follow(node: fx.Node) -> PostOp:
        users = list(node.users)
        if len(users) != 1:
            return PostOp()
        user = users[0]
        if user.op == "call_module" and isinstance(model.get_submodule(user.target), _BatchNorm):
            after = list(user.users)
            return PostOp(user.target, len(after) == 1 and _is_relu_node(model, after[0]))
        return PostOp(None, _is_relu_node(model, user))

    return {n: _combine([follow(node) for node in found]) for n, found in nodes.items()}


@torch.no_grad()
def analyse(model: nn.Module, example: Inputs, use_fx: bool = True) -> LayerGraph:
    """Execution order, post-ops and tensor sizes of a converted model's quantized layers.

    ``example`` is a small batch of inputs (one or two samples are enough). The probe runs the
    model at full precision in inference mode; the model's state is left as it was.
    """
    layers = quant_layers(model)
    names_by_id = {id(m): n for n, m in model.named_modules()}
    order: list[str] = []
    calls: dict[str, int] = {}
    in_numel: dict[str, int] = {}
    out_numel: dict[str, int] = {}
    layer_outputs: dict[str, list[torch.Tensor]] = {}
    bn_io: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    batch = num_samples(example)
    element_size = [4]

    def layer_hook(name):
        def fn(module, args, out):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
            ins = [t for t in _tensors(args) if t.is_floating_point()]
            in_numel[name] = in_numel.get(name, 0) + sum(t.numel() for t in ins[:3]) // batch
            outs = _tensors(out)
            out_numel[name] = out_numel.get(name, 0) + outs[0].numel() // batch
            element_size[0] = max(element_size[0], outs[0].element_size())
            layer_outputs.setdefault(name, []).append(outs[0])
        return fn

    def bn_hook(module, args, out):
        bn_io.append((names_by_id[id(module)], args[0], out))

    handles = [m.register_forward_hook(layer_hook(n)) for n, m in layers.items()]
    handles += [m.register_forward_hook(bn_hook) for m in model.modules() if isinstance(m, _BatchNorm)]
    was_training = model.training
    recorder = _Recorder()
    try:
        model.eval()
        with precision(model, FLOAT_BITS), recorder:
            run_model(model, example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    seen = [n for n in layers if n in calls]
    post = _hook_post_ops(layer_outputs, bn_io, recorder.calls)
    method, fx_error, fx_graph = "hooks", None, None
    if use_fx and not is_keyword_inputs(example):   # a traced graph takes one tensor input
        try:
            fx_graph = trace(model)
            post = fx_post_ops(model, seen, fx_graph)
            method = "fx"
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use the hook observations
            fx_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    elif use_fx:
        fx_error = "the model takes keyword inputs (a dict), and a traced graph takes one tensor"
    return LayerGraph(order=order, calls=calls, post=post, method=method, in_numel=in_numel,
                      out_numel=out_numel, element_size=element_size[0], fx_error=fx_error,
                      fx_graph=fx_graph if method == "fx" else None)
