"""Packed exports: quantized weights stored as integer codes at their bit-width, in safetensors, with a JSON
sidecar (``DIR/model.safetensors`` + ``DIR/model.json``, the layout of a checkpoint).

One precision (uniform bits or a per-layer bit map): every quantized weight is stored as its codes packed
at ``b`` bits (1..8) plus the grid's terms (per-channel scale and zero point, DoReFa's ``mean|w|``, weight
bias correction's per-channel ``mean_q``/``gain``/``mean_w``); BatchNorms keep only the statistics that
precision uses; 32-bit layers keep float weights. Loading dequantizes the codes by the quantizer's own
float operations, so the loaded model's outputs equal the fake-quantized model's bit for bit; its layers
are *frozen* at the exported precision.

Every precision in one file (a *package*, ``bits=[1, 2, ..., 8]``): the finest codes of each layer plus,
for every coarser bit-width, the difference between its codes and a prediction from the finest ones
(mostly zeros, deflate-compressed) and that bit-width's grid terms. With 32 among the precisions the
float weights themselves are needed for the 32-bit model; they determine every other precision too, so
the package then holds them, losslessly compressed (byte planes, deflate), and each precision is computed
at load time by the model's own quantizers. Either way ``anybit.load(path, bits=3)`` is exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..checkpoint import (
    CheckpointError,
    _atomic_write,
    _build,
    _check_fit,
    checkpoint_paths,
    read_tagged_json,
    write_json,
)
from ..quant import (
    FLOAT_BITS,
    PRECISION_BN_TYPES,
    QuantSpec,
    SwitchableBatchNorm,
    convert,
    get_precision,
    quant_layers,
    set_precision,
    stats_key,
)
from .bitpack import pack_codes, packed_nbytes, unpack_codes
from .codes import WeightCodes, quantized_weight_names, weight_codes
from .errors import ExportError, ExportFileError

FORMAT = "anybit-packed"
FORMAT_VERSION = 1
MAX_PACKED_BITS = 8

Precision = int | Mapping[str, tuple[int, int]]


# ---------------------------------------------------------------------------------------------- helpers
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _deflate_floats(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bytes split into its four byte planes, each deflated (lossless)."""
    raw = t.detach().cpu().contiguous().to(torch.float32).numpy().view(np.uint8).reshape(-1, 4)
    parts = [zlib.compress(raw[:, i].tobytes(), 9) for i in range(4)]
    header = np.array([len(p) for p in parts], dtype="<u8").tobytes()
    return torch.from_numpy(np.frombuffer(header + b"".join(parts), dtype=np.uint8).copy())


def _inflate_floats(data: torch.Tensor, shape: list[int]) -> torch.Tensor:
    buf = data.numpy().tobytes()
    sizes = np.frombuffer(buf[:32], dtype="<u8")
    count = int(np.prod(shape)) if shape else 1
    planes, offset = [], 32
    for size in sizes:
        plane = zlib.decompress(buf[offset:offset + int(size)])
        if len(plane) != count:
            raise ValueError(f"a byte plane holds {len(plane)} bytes, expected {count}")
        planes.append(np.frombuffer(plane, dtype=np.uint8))
        offset += int(size)
    if offset != len(buf):
        raise ValueError("trailing bytes after the byte planes")
    raw = np.stack(planes, axis=1).reshape(-1).copy()
    return torch.from_numpy(raw.view(np.float32).reshape(shape))


def _deflate_ints(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    arr = t.reshape(-1).numpy()
    dtype = "int8" if arr.size == 0 or (arr.min() >= -128 and arr.max() <= 127) else "int16"
    data = zlib.compress(arr.astype(dtype).tobytes(), 9)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), dtype


def _inflate_ints(data: torch.Tensor, dtype: str, count: int) -> torch.Tensor:
    arr = np.frombuffer(zlib.decompress(data.numpy().tobytes()), dtype=dtype)
    if arr.size != count:
        raise ValueError(f"{arr.size} corrections, expected {count}")
    return torch.from_numpy(arr.astype(np.int64))


def _predict(base: torch.Tensor, base_span: int, span: int) -> torch.Tensor:
    """Unsigned codes of a coarser grid predicted from the finest ones (same normalised position)."""
    return torch.round(base.to(torch.float64) * (span / base_span)).to(torch.int64)


def _precision_label(p: Precision) -> str:
    return f"{p}-bit" if isinstance(p, int) else "bit map"


# ------------------------------------------------------------------------------------- which statistics
@torch.no_grad()
def batchnorm_usage(model: nn.Module, example_input: torch.Tensor) -> dict[str, set[str]]:
    """For every per-precision and switchable BatchNorm, the statistics keys one forward pass at the
    model's current precision uses (the keys of the sets to keep)."""
    used: dict[str, set[str]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, PRECISION_BN_TYPES):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, n=name: used.setdefault(n, set()).add(stats_key(*mod.input_precision()))))
        elif isinstance(m, SwitchableBatchNorm):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, n=name: used.setdefault(n, set()).add(mod.active)))
    try:
        model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return used


# ------------------------------------------------------------------------------------------------ write
class _Writer:
    """Collects tensors (deduplicated per weight) and their descriptions for the sidecar."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, t: torch.Tensor) -> str:
        self.tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    def put_param(self, prefix: str, name: str, t: torch.Tensor) -> dict:
        """A grid term: stored once per weight when several bit-widths share it (DoReFa's mean|w|)."""
        t = t.detach().to(torch.float32)
        for key, stored in self.tensors.items():
            if key.startswith(prefix + "@") and stored.shape == t.reshape(-1).shape and torch.equal(stored, t.reshape(-1)):
                return {"key": key, "shape": list(t.shape)}
        return {"key": self.put(f"{prefix}@{name}", t.reshape(-1)), "shape": list(t.shape)}


def _is_zero(t: torch.Tensor) -> bool:
    """All +0.0 (a symmetric grid's zero points): nothing to store."""
    return bool((t == 0).all()) and not bool(torch.signbit(t).any())


def _codes_entry(w: _Writer, prefix: str, codes: WeightCodes) -> dict:
    entry = {"kind": codes.kind, "qmin": codes.qmin, "qmax": codes.qmax, "params": {}}
    for name, t in codes.params.items():
        if name == "zero_point" and _is_zero(t):
            entry["params"][name] = {"zeros": list(t.shape)}
        else:
            entry["params"][name] = w.put_param(prefix, f"b{codes.bits}.{name}", t)
    if codes.wbc_stats is not None:   # the quantized weight's mean and std (and so the gain) follow from the codes
        entry["wbc"] = {n: w.put_param(prefix, f"wbc_{n}", t) for n, t in zip(("mean_w", "std_w"), codes.wbc_stats)}
    return entry


def _layer_bits(precisions: list[dict[str, tuple[int, int]]], name: str) -> list[int]:
    return sorted({p[name][0] for p in precisions})


def _build_state(model: nn.Module, precisions: list[Precision], example_input: torch.Tensor,
                 representation: str, fold_bn: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and sidecar description of a packed export of ``model`` at ``precisions``."""
    layers = quant_layers(model)
    maps, bn_keys, switch_active = [], {}, []
    for p in precisions:
        set_precision(model, p)
        maps.append(get_precision(model))
        switch_active.append({n: m.active for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)})
        for name, keys in batchnorm_usage(model, example_input).items():
            bn_keys.setdefault(name, set()).update(keys)

    w = _Writer()
    info: dict[str, Any] = {}
    state = dict(model.state_dict())
    # weight grids calibrated per bit-width live on in the codes' terms (or are recomputed from floats)
    drop = {k for k in state if ".weight_quant.ranges." in k} if representation == "codes" else set()
    if representation == "codes":
        for name, keys in bn_keys.items():
            module = model.get_submodule(name)
            if isinstance(module, PRECISION_BN_TYPES):
                for key in module.trained_keys():
                    if key not in keys:
                        drop.update(f"{name}.{prefix}{key}" for prefix in ("running_mean_", "running_var_"))
                drop.update(k for k in state if k.startswith(f"{name}.num_batches_tracked_"))
            else:
                for key in list(module.bns.keys()):
                    prefix = f"{name}.bns.{key}."
                    if key not in keys:
                        drop.update(k for k in state if k.startswith(prefix))
                    else:
                        drop.update(k for k in state if k.startswith(prefix + "num_batches_tracked"))
        # the statistics a per-precision BatchNorm derives for an untrained precision are stored under its key
        for name, keys in bn_keys.items():
            module = model.get_submodule(name)
            if isinstance(module, PRECISION_BN_TYPES):
                for key in keys - set(module.trained_keys()):
                    wb, ab = _parse_stats_key(key)
                    mean, var = module.statistics(wb, ab)
                    state[f"{name}.running_mean_{key}"] = mean.detach().clone()
                    state[f"{name}.running_var_{key}"] = var.detach().clone()

    folded = _fold_batchnorms(model, state, drop, bn_keys) if representation == "codes" and fold_bn else {}

    for lname, layer in layers.items():
        layer_info = {"weights": {}}
        for pname in quantized_weight_names(layer):
            key = f"{lname}.{pname}"
            weight = layer.get_parameter(pname).detach()
            bits = _layer_bits(maps, lname)
            if representation == "float":
                drop.add(key)
                layer_info["weights"][pname] = {"shape": list(weight.shape), "float": w.put(key + "@deflate",
                                                                                             _deflate_floats(weight))}
                continue
            if bits == [FLOAT_BITS]:
                continue   # a float layer keeps its float weight in the state
            if FLOAT_BITS in bits or max(bits) > MAX_PACKED_BITS:
                raise ExportError(f"layer {lname!r} runs at {bits}-bit weights; packed exports store codes of 1..8 "
                                  f"bits (or float weights at 32 bits, exported on their own or in a package "
                                  f"with 32 among its bit-widths)")
            drop.add(key)
            all_codes = {b: weight_codes(layer, pname, b, where=f"layer {lname!r}") for b in bits}
            base_bits = max(bits)
            base = all_codes[base_bits]
            base_span = base.qmax - base.qmin
            base_u = base.codes - base.qmin
            entry = {"shape": list(weight.shape), "base_bits": base_bits, "bits": {}}
            entry["codes"] = w.put(f"{key}@b{base_bits}.codes", pack_codes(base_u, base_bits))
            for b, codes in all_codes.items():
                item = _codes_entry(w, key, codes)
                if b != base_bits:
                    delta = (codes.codes - codes.qmin) - _predict(base_u, base_span, codes.qmax - codes.qmin)
                    data, dtype = _deflate_ints(delta)
                    item["delta"] = {"key": w.put(f"{key}@b{b}.delta", data), "dtype": dtype}
                entry["bits"][str(b)] = item
            layer_info["weights"][pname] = entry
        info[lname] = layer_info

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k not in drop}
    tensors.update(w.tensors)
    description = {
        "representation": representation,
        "layers": info,
        "precisions": [{"bits": p if isinstance(p, int) else None,
                        "layers": {n: list(pair) for n, pair in m.items() if not isinstance(p, int) or pair != (p, p)},
                        "switchable_bn": active}
                       for p, m, active in zip(precisions, maps, switch_active)],
        "folded_bn": folded,
    }
    return tensors, description


def _folded_terms(mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                  dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(alpha, beta)`` PyTorch's BatchNorm computes in eval mode (``out = x * alpha + beta``),
    read off its own kernel: ``alpha`` at ``x = 1`` with mean and bias 0, ``beta`` at ``x = 0``."""
    shape = (1, mean.numel()) + (1,) * (dims - 2)
    with torch.no_grad():
        alpha = F.batch_norm(torch.ones(shape), torch.zeros_like(mean), var, weight, torch.zeros_like(bias),
                             False, 0.0, eps)
        beta = F.batch_norm(torch.zeros(shape), mean, var, weight, bias, False, 0.0, eps)
    return alpha.reshape(-1).clone(), beta.reshape(-1).clone()


def _fold_batchnorms(model: nn.Module, state: dict[str, torch.Tensor], drop: set[str],
                     bn_keys: dict[str, set[str]]) -> dict[str, str | None]:
    """BatchNorms that run with one set of statistics keep two terms per channel instead of four: the
    ``alpha`` and ``beta`` of ``x * alpha + beta``, as the affine terms, with mean 0, variance 1 and eps 0
    (then PyTorch's BatchNorm computes exactly ``alpha`` and ``beta`` again). Returns ``{name: key}`` (the
    statistics key of a per-precision or switchable BatchNorm, ``None`` for a plain one)."""
    folded: dict[str, str | None] = {}
    inside_switchable = {id(bn) for m in model.modules() if isinstance(m, SwitchableBatchNorm) for bn in m.bns.values()}
    for name, m in model.named_modules():
        if id(m) in inside_switchable:
            continue
        if isinstance(m, SwitchableBatchNorm):
            keys = bn_keys.get(name, set())
            if len(keys) != 1:
                continue
            key = keys.pop()
            keys.add(key)
            targets = [(f"{name}.bns.{key}", m.bns[key], "running_mean", "running_var", key)]
        elif isinstance(m, PRECISION_BN_TYPES):
            keys = bn_keys.get(name, set())
            if len(keys) != 1:
                continue
            key = next(iter(keys))
            targets = [(name, m, f"running_mean_{key}", f"running_var_{key}", key)]
        elif isinstance(m, _BatchNorm) and m.track_running_stats:
            drop.add(f"{name}.num_batches_tracked")
            targets = [(name, m, "running_mean", "running_var", None)]
        else:
            continue
        for prefix, bn, mean_name, var_name, key in targets:
            if bn.weight is None or bn.bias is None or f"{prefix}.{mean_name}" not in state:
                continue
            dims = 2 if isinstance(bn, nn.BatchNorm1d) else 4
            alpha, beta = _folded_terms(state[f"{prefix}.{mean_name}"], state[f"{prefix}.{var_name}"],
                                        bn.weight.detach(), bn.bias.detach(), bn.eps, dims)
            state[f"{prefix}.weight"], state[f"{prefix}.bias"] = alpha, beta
            drop.update({f"{prefix}.{mean_name}", f"{prefix}.{var_name}"})
            folded[name] = key
    return folded


def _unfold_batchnorms(model: nn.Module, state: dict[str, torch.Tensor], folded: dict[str, str | None]) -> None:
    """Mean 0, variance 1 and eps 0 for the BatchNorms :func:`_fold_batchnorms` folded."""
    for name, key in folded.items():
        m = model.get_submodule(name)
        if isinstance(m, SwitchableBatchNorm):
            prefix, bn, mean_name, var_name = f"{name}.bns.{key}", m.bns[key], "running_mean", "running_var"
        elif isinstance(m, PRECISION_BN_TYPES):
            prefix, bn, mean_name, var_name = name, m, f"running_mean_{key}", f"running_var_{key}"
        else:
            prefix, bn, mean_name, var_name = name, m, "running_mean", "running_var"
        like = state[f"{prefix}.weight"]
        state[f"{prefix}.{mean_name}"] = torch.zeros_like(like)
        state[f"{prefix}.{var_name}"] = torch.ones_like(like)
        bn.eps = 0.0


def _parse_stats_key(key: str) -> tuple[int, int]:
    if key.isdigit():
        return int(key), int(key)
    w_part, a_part = key[1:].split("a")
    return int(w_part), int(a_part)


LAYOUT = "__layout__"
DEFLATED = "@planes"
SMALL = 4096   # tensors up to this many elements share one flat tensor per dtype (each costs a header entry)


def _bundle(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Small tensors concatenated into one flat tensor per dtype; the index says where each one lies. The
    float ones (grid terms, BatchNorms, biases) are stored deflated by byte planes where that is smaller
    (lossless); packed codes stay as they are."""
    out, index, parts, deflated = {}, {}, {}, {}
    for key, t in tensors.items():
        if t.numel() > SMALL:
            out[key] = t
            continue
        dtype = str(t.dtype).removeprefix("torch.")
        chunks = parts.setdefault(dtype, [])
        offset = sum(c.numel() for c in chunks)
        chunks.append(t.reshape(-1))
        index[key] = [dtype, offset, list(t.shape)]
    for dtype, chunks in parts.items():
        flat = torch.cat(chunks)
        packed = _deflate_floats(flat) if dtype == "float32" else None
        if packed is not None and packed.numel() < flat.numel() * flat.element_size():
            out[f"__small__.{dtype}{DEFLATED}"] = packed
            deflated[dtype] = flat.numel()
        else:
            out[f"__small__.{dtype}"] = flat
    return out, index, deflated


def _unbundle(tensors: dict[str, torch.Tensor], index: dict, deflated: dict) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in tensors.items() if not k.startswith("__small__.")}
    flats = {k.removeprefix("__small__."): v for k, v in tensors.items() if k.startswith("__small__.")}
    for dtype, count in deflated.items():
        flats[dtype] = _inflate_floats(flats.pop(dtype + DEFLATED), [count])
    for key, (dtype, offset, shape) in index.items():
        flat = flats[dtype]
        count = int(np.prod(shape)) if shape else 1
        if offset + count > flat.numel():
            raise ValueError(f"tensor {key!r} lies outside the bundle of small {dtype} tensors")
        out[key] = flat[offset:offset + count].reshape(shape).clone()
    return out


# ------------------------------------------------------------------------------------------------- read
def _codes_from(entry: dict, item: dict, bits: int, tensors: dict[str, torch.Tensor], where: str) -> WeightCodes:
    shape = entry["shape"]
    count = int(np.prod(shape)) if shape else 1
    base_item = entry["bits"][str(entry["base_bits"])]
    base_span = base_item["qmax"] - base_item["qmin"]
    base_u = unpack_codes(tensors[entry["codes"]], entry["base_bits"], count)
    span = item["qmax"] - item["qmin"]
    if bits == entry["base_bits"]:
        u = base_u
    else:
        delta = item["delta"]
        u = _predict(base_u, base_span, span) + _inflate_ints(tensors[delta["key"]], delta["dtype"], count)
    if u.numel() and (u.min() < 0 or u.max() > span):
        raise ValueError(f"{where}: codes outside their {bits}-bit grid")

    def param(d: dict) -> torch.Tensor:
        if "zeros" in d:
            return torch.zeros(d["zeros"])
        return tensors[d["key"]].reshape(d["shape"])

    params = {n: param(d) for n, d in item["params"].items()}
    codes = WeightCodes(bits, item["kind"], (u + item["qmin"]).reshape(shape), item["qmin"], item["qmax"], params)
    if "wbc" in item:
        codes.with_wbc_stats(param(item["wbc"]["mean_w"]), param(item["wbc"]["std_w"]))
    return codes


def _pair_of(chosen: dict, name: str) -> tuple[int, int]:
    """A layer's (w, a) bits in a stored precision: listed, or the uniform bit-width."""
    pair = chosen["layers"].get(name)
    if pair is None:
        if chosen["bits"] is None:
            raise ExportFileError(f"the export's bit map has no entry for layer {name!r}; it is corrupt")
        return chosen["bits"], chosen["bits"]
    return tuple(pair)


def _choose(description: dict, bits: int | None, where: str) -> dict:
    precisions = description["precisions"]
    if len(precisions) == 1 and bits is None:
        return precisions[0]
    served = [p["bits"] for p in precisions]
    if bits is None:
        raise ExportFileError(f"{where} is an every-precision package for bit-widths {served}; choose one: "
                              f"anybit.load(path, bits=B)")
    for p in precisions:
        if p["bits"] == bits:
            return p
    what = f"bit-widths {served}" if None not in served else "one per-layer bit map"
    raise ExportFileError(f"{where} holds {what}, not {bits} bits; export that precision "
                          f"(anybit export --bits {bits}) or load one it holds")


def apply_packed(model: nn.Module, tensors: dict[str, torch.Tensor], sidecar: dict, bits: int | None = None,
                 where: str = "the export") -> nn.Module:
    """Load a packed export's tensors into a converted ``model`` of the same architecture, at ``bits`` (or
    the one precision it holds). Raises :class:`ExportFileError` when they do not fit."""
    description = sidecar["packed"]
    chosen = _choose(description, bits, where)
    representation = description["representation"]
    state = dict(tensors)
    consumed: set[str] = set()
    layers = quant_layers(model)
    unknown = sorted(set(description["layers"]) - set(layers))
    if unknown:
        raise ExportFileError(f"{where} names layers this model lacks: {unknown[:3]}")
    frozen: dict[str, int] = {}
    try:
        for lname, layer_info in description["layers"].items():
            w_bits = _pair_of(chosen, lname)[0]
            for pname, entry in layer_info["weights"].items():
                key = f"{lname}.{pname}"
                if representation == "float":
                    state[key] = _inflate_floats(tensors[entry["float"]], entry["shape"])
                    consumed.add(entry["float"])
                    continue
                item = entry["bits"].get(str(w_bits))
                if item is None:
                    raise ExportFileError(f"{where}: layer {lname!r} has no {w_bits}-bit codes")
                state[key] = _codes_from(entry, item, w_bits, tensors, f"{where}: {key}").dequantize()
                frozen[lname] = w_bits
            consumed.update(k for k in tensors if k.startswith(tuple(f"{lname}.{p}@" for p in layer_info["weights"])))
    except KeyError as e:
        raise ExportFileError(f"{where} is corrupt: tensor or field {e} is missing; export it again") from e
    except (ValueError, RuntimeError, zlib.error) as e:
        if isinstance(e, ExportFileError):
            raise
        raise ExportFileError(f"{where} is corrupt ({e}); export it again") from e
    for k in consumed:
        state.pop(k, None)

    if representation == "codes":
        _unfold_batchnorms(model, state, description.get("folded_bn", {}))
        _keep_only_stored_statistics(model, state)
        for name, m in model.named_modules():   # not stored: an eval-mode BatchNorm does not use it
            if isinstance(m, _BatchNorm) and m._buffers.get("num_batches_tracked") is not None:
                state.setdefault(f"{name}.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        for layer in layers.values():
            layer.weight_quant.clear_ranges()
    expected = model.state_dict()
    _check_fit(expected, state, f"{where} does not fit this model")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ExportFileError(f"{where} does not fit this model: {str(e).splitlines()[-1][:300]}") from e
    if result.unexpected_keys:
        raise ExportFileError(f"{where} does not fit this model: {len(result.unexpected_keys)} unexpected tensors "
                              f"(e.g. {result.unexpected_keys[:3]})")
    for name in layers:
        layers[name].set_bits(*_pair_of(chosen, name))
    for name, active in chosen.get("switchable_bn", {}).items():
        model.get_submodule(name).active = active
    for name, layer in layers.items():
        layer.frozen_bits = frozen.get(name)
    return model


def _keep_only_stored_statistics(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Per-precision and switchable BatchNorms hold exactly the statistics sets the export stored."""
    for name, m in model.named_modules():
        if isinstance(m, PRECISION_BN_TYPES):
            for key in m.trained_keys():
                if f"{name}.running_mean_{key}" not in state:
                    for prefix in ("running_mean_", "running_var_", "num_batches_tracked_"):
                        del m._buffers[prefix + key]
            for k in list(state):
                if k.startswith(f"{name}.running_mean_"):
                    key = k[len(f"{name}.running_mean_"):]
                    if "running_mean_" + key not in m._buffers:
                        m._add_set(key, torch.zeros_like(state[k]), torch.ones_like(state[k]))
            for key in m.trained_keys():
                state.setdefault(f"{name}.num_batches_tracked_{key}", torch.tensor(0, dtype=torch.long))
        elif isinstance(m, SwitchableBatchNorm):
            prefix = f"{name}.bns."
            stored = {k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}
            for key in list(m.bns.keys()):
                if key not in stored:
                    del m.bns[key]
            for key in stored:
                if key not in m.bns:
                    m.add(key, next(iter(m.bns.keys())))
            for key in m.bns.keys():
                state.setdefault(f"{name}.bns.{key}.num_batches_tracked", torch.tensor(0, dtype=torch.long))


def read_packed_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a packed export, checked, without reading its tensors."""
    tensors_path, sidecar_path = checkpoint_paths(path)
    missing = [str(p) for p in (tensors_path, sidecar_path) if not p.is_file()]
    if missing:
        raise ExportFileError(f"no packed export at {path}: missing {', '.join(missing)} (anybit export writes "
                              f"DIR/model.safetensors and DIR/model.json)")
    sidecar = read_tagged_json(sidecar_path, FORMAT, ExportFileError, "an anybit packed export", "export")
    if sidecar.get("format_version", 0) > FORMAT_VERSION:
        raise ExportFileError(f"{sidecar_path} has format version {sidecar['format_version']}, newer than this "
                              f"anybit reads ({FORMAT_VERSION}); upgrade anybit")
    packed = sidecar.get("packed")
    if not isinstance(packed, dict) or not isinstance(packed.get("precisions"), list) or \
            not all(isinstance(p, dict) and isinstance(p.get("layers", {}), dict) for p in packed["precisions"]):
        raise ExportFileError(f"{sidecar_path} is corrupt: it has no valid 'packed' description; export it again")
    for field in ("model", "metadata"):
        if not isinstance(sidecar.get(field, {}), dict):
            raise ExportFileError(f"{sidecar_path} is corrupt: '{field}' must be an object; export it again")
    return sidecar


def read_packed(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The sidecar and tensors of a packed export, checked (checksum, format) without building a model."""
    sidecar = read_packed_sidecar(path)
    tensors_path, sidecar_path = checkpoint_paths(path)
    try:
        data = tensors_path.read_bytes()
    except OSError as e:
        raise ExportFileError(f"{tensors_path} could not be read ({e})") from e
    if sidecar.get("sha256") and _sha256(data) != sidecar["sha256"]:
        raise ExportFileError(f"{tensors_path} is corrupt or truncated: its checksum does not match the one in "
                              f"{sidecar_path.name} ({len(data)} bytes); export it again")
    try:
        raw = load_bytes(data)
        layout = json.loads(zlib.decompress(raw.pop(LAYOUT).numpy().tobytes()))
        sidecar["packed"]["layers"] = layout["layers"]
        sidecar["packed"]["folded_bn"] = layout.get("folded_bn", {})
        tensors = _unbundle(raw, layout["small"], layout.get("deflated", {}))
    except (SafetensorError, ValueError, KeyError, TypeError, zlib.error) as e:
        raise ExportFileError(f"{tensors_path} could not be read as safetensors ({e}); the export is corrupt") from e
    return sidecar, tensors


def load_packed(path: str | os.PathLike, model: nn.Module | None = None, bits: int | None = None,
                map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a packed export or package (see the module docstring); ``bits`` picks a package's precision."""
    sidecar, tensors = read_packed(path)
    if model is None:
        try:
            model = _build(sidecar, path)
        except CheckpointError as e:
            raise ExportFileError(str(e)) from e
    info = sidecar.get("model", {})
    if "quant_spec" in info and not quant_layers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, QuantSpec.from_dict(info["quant_spec"]))
    apply_packed(model, tensors, sidecar, bits, where=str(path))
    model.anybit_meta = {**info, "checkpoint": sidecar.get("metadata", {}), "export": sidecar["packed"]}
    return model.to(map_location)


def write_packed(model: nn.Module, path: str | os.PathLike, precisions: list[Precision], example_input: torch.Tensor,
                 metadata: dict | None = None) -> dict:
    """Write a packed export of ``model`` (converted, in eval mode) at ``precisions``; returns sizes.

    Before anything is written the export is loaded back into a copy of the model and its outputs are
    compared with the fake-quantized model's on ``example_input`` at every precision: they must be equal.
    """
    if not precisions:
        raise ExportError("nothing to export: give at least one precision")
    uniform = [p for p in precisions if isinstance(p, int)]
    if len(precisions) > 1 and len(uniform) != len(precisions):
        raise ExportError("a package holds uniform bit-widths; export a bit map on its own")
    representation = "float" if len(precisions) > 1 and FLOAT_BITS in uniform else "codes"
    saved_precision = get_precision(model)
    saved_active = {n: m.active for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)}

    def restore() -> None:
        for name, pair in saved_precision.items():
            quant_layers(model)[name].set_bits(*pair)
        for name, active in saved_active.items():
            model.get_submodule(name).active = active

    try:
        with torch.no_grad():
            expected = []
            for p in precisions:
                set_precision(model, p)
                expected.append(model(example_input))
    finally:
        restore()
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {k: v for k, v in (getattr(model, "anybit_meta", {}) or {}).items()
                  if k in ("arch", "arch_kwargs", "quant_spec")},
        "metadata": metadata or {},
    }
    # folded BatchNorms reproduce PyTorch's own per-channel terms; should a kernel compute them differently,
    # the check below finds it and the export keeps the four statistics of every BatchNorm instead
    for fold_bn in (True, False):
        try:
            with torch.no_grad():
                tensors, description = _build_state(model, precisions, example_input, representation, fold_bn)
        finally:
            restore()
        sidecar["packed"] = description
        diff = _verify(model, tensors, sidecar, precisions, expected, example_input)
        if diff is None or not description["folded_bn"]:
            break
    if diff is not None:
        raise ExportError(f"internal error: the packed {diff[0]} model differs from the fake-quantized one (largest "
                          f"difference {diff[1]:.3g}); nothing was written. Please report it")
    bundled, small, deflated = _bundle(tensors)
    # the layout (every weight's grids, the folded BatchNorms, every tensor's place) is machine-readable detail:
    # deflated JSON inside the tensors file
    layout = json.dumps({"layers": description["layers"], "folded_bn": description["folded_bn"], "small": small,
                         "deflated": deflated}, separators=(",", ":")).encode()
    bundled[LAYOUT] = torch.from_numpy(np.frombuffer(zlib.compress(layout, 9), dtype=np.uint8).copy())
    sidecar["packed"] = {k: v for k, v in description.items() if k not in ("layers", "folded_bn")}
    data = save_bytes(bundled, metadata={"format": FORMAT})
    sidecar["sha256"] = _sha256(data)
    text = json.dumps(sidecar, separators=(",", ":")) + "\n"
    tensors_path, sidecar_path = checkpoint_paths(path)
    _atomic_write(tensors_path, lambda tmp: Path(tmp).write_bytes(data))
    _atomic_write(sidecar_path, lambda tmp: Path(tmp).write_text(text))
    return export_sizes(model, tensors, description, len(data) + len(text.encode()))


def _verify(model, tensors, sidecar, precisions, expected, example_input) -> tuple[str, float] | None:
    """``None`` if the export loads back into a model whose outputs on ``example_input`` equal the
    fake-quantized model's at every precision, else the first precision that differs and by how much."""
    for p, want in zip(precisions, expected):
        copy_ = copy.deepcopy(model)
        apply_packed(copy_, tensors, sidecar, p if isinstance(p, int) and len(precisions) > 1 else None,
                     where="the export being written")
        with torch.no_grad():
            got = copy_(example_input)
        if not torch.equal(got, want):
            return _precision_label(p), (got - want).abs().max().item()
    return None


def export_sizes(model: nn.Module, tensors: dict[str, torch.Tensor], description: dict, file_bytes: int) -> dict:
    """Bytes of the export file, of its packed codes, of everything else, and of the float weights and state."""
    float_state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    float_weights = code_bytes = 0
    for lname, layer in quant_layers(model).items():
        for pname in quantized_weight_names(layer):
            float_weights += layer.get_parameter(pname).numel() * 4
    for layer_info in description["layers"].values():
        for entry in layer_info["weights"].values():
            if "codes" in entry:
                code_bytes += tensors[entry["codes"]].numel()
                code_bytes += sum(tensors[i["delta"]["key"]].numel() for i in entry["bits"].values() if "delta" in i)
            elif "float" in entry:
                code_bytes += tensors[entry["float"]].numel()
    return {"file_bytes": file_bytes, "weight_bytes": code_bytes, "other_bytes": file_bytes - code_bytes,
            "float_weight_bytes": float_weights, "float_state_bytes": float_state,
            "file_vs_float_state": file_bytes / float_state, "weights_vs_float_weights": code_bytes / float_weights}


def packed_bytes_of(bits: int, count: int) -> int:
    return packed_nbytes(count, bits)
