"""BatchNorm with one set of running statistics per precision and one shared set of affine terms.

A multi-bit network with weight bias correction shares its BatchNorm's affine terms (γ, β) between
every bit-width, but one set of *running statistics* cannot fit them all: binarised weights change a
layer's output variance in a way no per-channel weight correction undoes (measured in
docs/training.md). :class:`PrecisionBatchNorm2d` keeps the affine terms shared and holds the running
mean and variance per trained precision, as buffers (no learnable parameter is added). A precision
that was never trained derives its statistics from the trained ones without data (``untrained_rule``).

Which precision's statistics a BatchNorm uses is the precision its input was computed at: the
precision of the quantizable layer that ran just before it (recorded in a :class:`PrecisionTrace`
shared by the model's quantizable layers and BatchNorms). In conv → BN networks that is the layer
that feeds it, so one rule serves uniform precisions and per-layer bit maps alike. A BatchNorm
behind a layer pinned at full precision (the usual first layer) uses the 32-bit set at every
precision: its input does not depend on the precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import FLOAT_BITS

UNTRAINED_RULES = ("interpolate", "nearest", "shared")


class PrecisionTrace:
    """The ``(w_bits, a_bits)`` of the quantizable layer of one model that ran last (``None`` before any)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None


def stats_key(w_bits: int, a_bits: int) -> str:
    """Name of a precision's statistics: ``"4"`` when w == a, else ``"w4a8"`` (as switchable BatchNorm)."""
    return str(w_bits) if w_bits == a_bits else f"w{w_bits}a{a_bits}"


def quantization_step(bits: int) -> float:
    """Step of a ``bits``-bit grid over a unit range (0 for full precision): what interpolation is linear in."""
    return 0.0 if bits >= FLOAT_BITS else 1.0 / (2**bits - 1)


_MEAN, _VAR, _COUNT = "running_mean_", "running_var_", "num_batches_tracked_"


class _PrecisionStatistics:
    """The per-precision part of :class:`PrecisionBatchNorm1d`/:class:`PrecisionBatchNorm2d`."""

    untrained_rule: str
    precision_trace: PrecisionTrace | None

    def _init_statistics(self, keys: list[str], untrained_rule: str) -> None:
        if untrained_rule not in UNTRAINED_RULES:
            raise ValueError(f"untrained_rule={untrained_rule!r} is unknown: expected one of {', '.join(UNTRAINED_RULES)}")
        if not keys:
            raise ValueError("per-precision BatchNorm needs at least one trained precision")
        if not self.track_running_stats:
            raise ValueError("per-precision BatchNorm statistics need a BatchNorm that tracks running statistics")
        self.untrained_rule = untrained_rule
        self.precision_trace = None
        mean, var = self.running_mean.detach().clone(), self.running_var.detach().clone()
        # the single set of the plain BatchNorm is replaced by the per-precision sets
        self.register_buffer("running_mean", None)
        self.register_buffer("running_var", None)
        self.register_buffer("num_batches_tracked", None)
        for key in keys:
            self._add_set(key, mean, var)

    # ------------------------------------------------------------------ the sets
    def trained_keys(self) -> list[str]:
        """Keys of the precisions that have their own statistics (``"1"``, ``"4"``, ``"32"``, ``"w4a8"``)."""
        return sorted((k[len(_MEAN):] for k in self._buffers if k.startswith(_MEAN)), key=_key_order)

    def _add_set(self, key: str, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.register_buffer(_MEAN + key, mean.detach().clone())
        self.register_buffer(_VAR + key, var.detach().clone())
        self.register_buffer(_COUNT + key, torch.tensor(0, dtype=torch.long, device=mean.device))

    def _set(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._buffers[_MEAN + key], self._buffers[_VAR + key], self._buffers[_COUNT + key]

    def reset_running_stats(self) -> None:
        for key in self.trained_keys():
            mean, var, count = self._set(key)
            mean.zero_()
            var.fill_(1)
            count.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs):
        # A checkpoint may hold statistics for precisions added after conversion (trained or re-estimated
        # there): create them so that they load.
        for name, value in state_dict.items():
            if name.startswith(prefix + _MEAN):
                key = name[len(prefix + _MEAN):]
                if "." not in key and _MEAN + key not in self._buffers:
                    self._add_set(key, torch.zeros_like(value), torch.ones_like(value))
        # nn.Module's, not _NormBase's: that one adds the plain BatchNorm's num_batches_tracked to versionless
        # state dicts, a buffer this class does not have
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args, **kwargs)

    # ------------------------------------------------------------------ which statistics
    def input_precision(self) -> tuple[int, int]:
        """The precision this BatchNorm's input was computed at (the last quantizable layer to run; the top
        trained precision when none has)."""
        last = self.precision_trace.last if self.precision_trace is not None else None
        if last is not None:
            return last
        top = max((int(k) for k in self.trained_keys() if k.isdigit()), default=FLOAT_BITS)
        return top, top

    def statistics(self, w_bits: int, a_bits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Running mean and variance used at ``(w_bits, a_bits)``: the precision's own set if it was trained,
        else the set of its weight bit-width (weights decide a layer's output statistics), else derived
        from the trained bit-widths by ``untrained_rule`` without data:

        ``interpolate``: linear between the nearest trained bit-widths below and above, in the grid's step
        ``1/(2^b - 1)`` (0 at 32 bits); the nearest one outside the trained range.
        ``nearest``: the nearest trained bit-width (ties to the higher).  ``shared``: the average of all
        trained bit-widths' sets, equally weighted (what one shared set would hold).
        """
        a_bits = w_bits if a_bits is None else a_bits
        keys = self.trained_keys()
        for key in (stats_key(w_bits, a_bits), str(w_bits)):
            if key in keys:
                mean, var, _ = self._set(key)
                return mean, var
        trained = sorted(int(k) for k in keys if k.isdigit())
        if not trained:
            raise ValueError(f"this BatchNorm has no statistics for whole bit-widths (it has {keys})")
        if self.untrained_rule == "shared":
            sets = [self._set(str(b)) for b in trained]
            return sum(s[0] for s in sets) / len(sets), sum(s[1] for s in sets) / len(sets)
        below = [b for b in trained if b < w_bits]
        above = [b for b in trained if b > w_bits]
        if self.untrained_rule == "nearest" or not below or not above:
            nearest = min(trained, key=lambda t: (abs(t - w_bits), -t))
            mean, var, _ = self._set(str(nearest))
            return mean, var
        lo, hi = below[-1], above[0]
        t = (quantization_step(w_bits) - quantization_step(hi)) / (quantization_step(lo) - quantization_step(hi))
        (m_lo, v_lo, _), (m_hi, v_hi, _) = self._set(str(lo)), self._set(str(hi))
        return t * m_lo + (1 - t) * m_hi, t * v_lo + (1 - t) * v_hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        w_bits, a_bits = self.input_precision()
        if self.training:
            key = stats_key(w_bits, a_bits)
            if _MEAN + key not in self._buffers:   # trained at a new precision: it gets its own statistics
                self._add_set(key, *self.statistics(w_bits, a_bits))
            mean, var, count = self._set(key)
            count.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(count)
            return F.batch_norm(x, mean, var, self.weight, self.bias, True, factor, self.eps)
        mean, var = self.statistics(w_bits, a_bits)
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", statistics={self.trained_keys()}, untrained_rule={self.untrained_rule}"


class PrecisionBatchNorm1d(_PrecisionStatistics, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with running statistics per precision (see the module docstring)."""


class PrecisionBatchNorm2d(_PrecisionStatistics, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with running statistics per precision (see the module docstring)."""


PRECISION_BN_TYPES = (PrecisionBatchNorm1d, PrecisionBatchNorm2d)
_FROM_PLAIN = {nn.BatchNorm1d: PrecisionBatchNorm1d, nn.BatchNorm2d: PrecisionBatchNorm2d}


def precision_batchnorm(bn: nn.modules.batchnorm._BatchNorm, keys: list[str],
                        untrained_rule: str = "interpolate") -> nn.Module:
    """A per-precision copy of ``bn`` (same affine parameter objects; every set starts from ``bn``'s statistics)."""
    cls = _FROM_PLAIN[type(bn)]
    out = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats, device="meta")
    for name, p in bn.named_parameters(recurse=False):
        setattr(out, name, p)
    for name, b in bn.named_buffers(recurse=False):
        out._buffers[name] = b
    out._init_statistics(keys, untrained_rule)
    out.train(bn.training)
    return out


def _key_order(key: str):
    return (0, int(key)) if key.isdigit() else (1, key)


def bn_state(modules: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    """Copies of every running-statistics buffer of ``modules`` (plain or per-precision BatchNorms)."""
    return [{k: v.detach().clone() for k, v in m._buffers.items()
             if v is not None and k.startswith(("running_", "num_batches_tracked"))} for m in modules]


def restore_bn_state(modules: list[nn.Module], saved: list[dict[str, torch.Tensor]],
                     only_unvisited: bool = False) -> None:
    """Put saved statistics back. Per-precision sets created since are removed. ``only_unvisited``: restore
    only the sets that saw no batch since (their count is 0), keep the others."""
    for m, state in zip(modules, saved):
        if isinstance(m, PRECISION_BN_TYPES):
            for key in m.trained_keys():
                if _MEAN + key not in state:
                    if not only_unvisited or int(m._buffers[_COUNT + key]) == 0:
                        for prefix in (_MEAN, _VAR, _COUNT):
                            del m._buffers[prefix + key]
                elif not only_unvisited or int(m._buffers[_COUNT + key]) == 0:
                    for prefix in (_MEAN, _VAR, _COUNT):
                        m._buffers[prefix + key].copy_(state[prefix + key])
        elif not only_unvisited or (m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0):
            for k, v in state.items():
                m._buffers[k].copy_(v)
