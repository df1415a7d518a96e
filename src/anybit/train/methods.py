"""The three training methods as small strategy objects: how the network is quantized and shared.

The trainer's loop is the same for all of them; a method only decides

* whether the bit-widths share one network (``anyprecision``, ``emqnet``) or each gets its own
  (``dedicated``), and
* the :class:`~anybit.QuantSpec` the network is converted with (BatchNorm kind, weight bias correction; the
  activation grid depends on whether the model has BatchNorm).

Distillation and data sampling defaults live in :class:`~anybit.train.TrainConfig`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

from torch import nn

from ..quant import QuantSpec, SwitchableBatchNorm, check_layers_run, convert, quant_layers
from .config import TrainConfig, TrainConfigError

# Activation quantizer of every method: Any-Precision's fixed clip to [0, 1] (BatchNorm's affine terms
# learn to fit activations into it). It is stable at 1 bit, where a learned (LSQ-style) range shared by all
# bit-widths diverges at the usual learning rates. The same for every method, so comparisons between
# methods isolate BatchNorm handling and weight bias correction.
#
# emqnet's one shared BatchNorm must see the same activation distribution at every precision: weight bias
# correction aligns the weights, and ``clip_float`` clips the float path's activations to the same [0, 1]
# (without rounding), otherwise the float pass's unclipped activations and the quantized passes' clipped
# ones give the shared BatchNorm running statistics that fit neither (measured: the float member of a
# short Fashion-MNIST run fell to chance). Any-Precision keeps plain ReLU at full precision, where its
# own BatchNorm absorbs the difference.
ACTIVATION = "fixed"
ACTIVATION_RANGE = (0.0, 1.0)

# Models without BatchNorm (LayerNorm transformers such as anybit.models' vit_tiny): the inputs of their
# quantized layers are LayerNorm outputs, attention outputs and GELU outputs, signed, so an unsigned [0, 1]
# clip zeroes their negative half. They get a signed symmetric grid over a fixed [-1, 1] (the idea of
# Any-Precision's [0, 1]: LayerNorm's affine terms and the weights learn to fit activations into it).
# Measured on the ViT (benchmarks/results/vit-ablation.json, one seed; docs/training.md, Vision transformers):
# better than the unsigned [0, 1] clip at 4, 8 and 32 bits (+1.2 to +1.7 points) but worse at 1 and 2 bits
# (-9.7, -1.1), so lower on the average over 1/2/4/8/32 (-1.3); better than a wider [-2, 2] (+0.9 average)
# and than a learned signed range (+9.8 average). Weight bias correction stays as each method sets it
# (without it emqnet lost 6.6 points on average). The attention matmuls' inputs and the softmax input stay
# float (QuantSpec.attn_matmul/attn_softmax): quantizing them cost 4 points at 2 bits, about nothing elsewhere.
NO_BN_ACTIVATION = "fixed"
NO_BN_ACTIVATION_RANGE = (-1.0, 1.0)


@dataclass(frozen=True)
class Method:
    """A multi-bit training method: weight sharing and quantization settings."""

    name: str
    shared: bool
    bn: str
    wbc: bool
    clip_float: bool
    summary: str

    def quant_spec(self, bits: tuple[int, ...], keep_first_last: int | None, bn_stats: str | None = None,
                   bn_untrained: str = "interpolate", batchnorm: bool = True) -> QuantSpec:
        """The spec a float model is converted with for this method and these trained bit-widths
        (``bn_stats="per-precision"``: shared affine terms, statistics per trained bit-width). ``batchnorm``:
        whether the model has BatchNorm; models without it get a signed activation grid (``NO_BN_ACTIVATION``)."""
        per_bits = self.bn == "switchable" or bn_stats == "per-precision"
        act = dict(act=ACTIVATION, act_range=ACTIVATION_RANGE) if batchnorm else \
            dict(act=NO_BN_ACTIVATION, act_range=NO_BN_ACTIVATION_RANGE, act_signed=True)
        return QuantSpec(
            weight="dorefa", **act, act_clip_float=self.clip_float,
            wbc=self.wbc, bn=self.bn, bn_stats=bn_stats or "shared",
            bn_untrained=bn_untrained, bn_bits=tuple(sorted(bits)) if per_bits else (),
            keep_first_last=keep_first_last,
        )

    def spec_for(self, config: TrainConfig, model: nn.Module | None = None) -> QuantSpec:
        """The spec for ``config`` and the float ``model`` it trains (``None``: a model with BatchNorm)."""
        return self.quant_spec(config.bits, config.keep_first_last, config.bn_stats, config.bn_untrained,
                               batchnorm=model is None or has_batchnorm(model))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` normalises with BatchNorm (any ``BatchNorm1d/2d/3d``, switchable ones included)."""
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, SwitchableBatchNorm)) for m in model.modules())


METHODS: dict[str, Method] = {
    "dedicated": Method("dedicated", shared=False, bn="shared", wbc=False, clip_float=False,
                        summary="one model per bit-width, full data each (cost and accuracy reference)"),
    "anyprecision": Method("anyprecision", shared=True, bn="switchable", wbc=False, clip_float=False,
                           summary="shared weights, one BatchNorm per bit-width, full data per bit-width"),
    "emqnet": Method("emqnet", shared=True, bn="shared", wbc=True, clip_float=True,
                     summary="weight bias correction, one BatchNorm's affine terms shared by every bit-width "
                             "(running statistics per bit-width by default), bit-wise coreset sampling"),
}


class BitModels(nn.ModuleDict):
    """The network(s) being trained, found by bit-width.

    Shared methods hold one network under ``"all"``; ``dedicated`` holds one per bit-width under
    ``"b1"``, ``"b2"``, ... . ``parameters()``/``state_dict()``/``to()`` cover all of them.
    """

    def __init__(self, models: dict[str, nn.Module], bits: tuple[int, ...]) -> None:
        super().__init__(models)
        self.bits = tuple(sorted(bits))

    @property
    def shared(self) -> bool:
        return "all" in self

    def for_bits(self, bits: int) -> nn.Module:
        """The network that runs at ``bits`` (for ``dedicated``: the one trained nearest to it)."""
        if self.shared:
            return self["all"]
        return self[f"b{nearest_bits(bits, self.bits)}"]


def nearest_bits(bits: int, trained: tuple[int, ...] | list[int]) -> int:
    """The trained bit-width closest to ``bits`` (ties go to the higher one)."""
    return min(trained, key=lambda t: (abs(t - bits), -t))


def build_models(model: nn.Module, config: TrainConfig, example_input=None) -> BitModels:
    """Convert ``model`` (any float ``nn.Module``) for ``config.method``; copies it per bit-width for
    ``dedicated``. An already converted model is used as it is (its own spec), after a check that a
    switchable-BN model has a BatchNorm for every trained bit-width. With ``example_input`` a check
    forward turns layers that never run their own forward back into float (reported, see
    :func:`anybit.quant.check_layers_run`). A model left with no layer that follows the precision
    (every one pinned by ``keep_first_last``) is refused: its bit-widths would train identical copies."""
    method = METHODS[config.method]
    spec = method.spec_for(config, model)
    if method.shared:
        models = BitModels({"all": _converted(model, spec, config)}, config.bits)
    else:
        models = BitModels({f"b{b}": _converted(copy.deepcopy(model), spec, config) for b in config.bits},
                           config.bits)
    for member in models.values():
        if example_input is not None:
            check_layers_run(member, example_input)
        _check_something_quantized(member, config)
    return models


def _check_something_quantized(model: nn.Module, config: TrainConfig) -> None:
    layers = quant_layers(model)
    low = [b for b in config.bits if b < 32]
    if low and layers and all(layer.pinned is not None for layer in layers.values()):
        pin = next(iter(layers.values())).pinned[0]
        raise TrainConfigError(
            f"keep_first_last={pin} pins every quantizable layer of {type(model).__name__} (its {len(layers)} "
            f"layer(s) are the first and the last), so bit-widths {low} would train identical copies at {pin} bits: "
            f"quantize them too (--keep-first-last none, TrainConfig(keep_first_last=None)) or use a model with "
            f"more layers")


def _converted(model: nn.Module, spec: QuantSpec, config: TrainConfig) -> nn.Module:
    if not quant_layers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unsupported layers are listed in the conversion report
            return convert(model, spec)
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm)]
    if bns:
        missing = [b for b in config.bits if str(b) not in bns[0].bns]
        if missing:
            raise TrainConfigError(
                f"the model was converted with switchable BatchNorm for {sorted(bns[0].bns.keys())}, "
                f"but bit-widths {missing} are trained: convert it with bn_bits covering every trained "
                f"bit-width, or pass the float model"
            )
    return model
