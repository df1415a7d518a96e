"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar.

``anybit.save(model, "run/model")`` writes ``run/model.safetensors`` and ``run/model.json``;
``anybit.load("run/model")`` rebuilds the architecture (registry models), converts it with the
saved :class:`QuantSpec` and loads the tensors. Nothing is ever unpickled. Both files are
written to temporary names and renamed, so an interrupted save never leaves a half-written
checkpoint behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .quant import VALID_BITS, QuantSpec, SwitchableBatchNorm, convert, get_precision, quant_layers, set_precision

FORMAT = "anybit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(tensors, sidecar)`` paths for a checkpoint given as a directory, a stem or either file."""
    p = Path(path)
    if p.is_dir():
        p = p / "model"
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _atomic_write(target: Path, write) -> None:
    """Write ``target`` through a temporary file in the same directory and rename it into place. An
    operating-system error (full disk, read-only directory) names ``target``, not the temporary file."""
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it private; give it an ordinary file's mode
        os.replace(tmp, target)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            e.filename = str(target)
            e.anybit_action = "writing"
        elif isinstance(e, SafetensorError) and "No space left" in str(e):   # safetensors' own write error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_tagged_json(path: Path, fmt: str, error: type[Exception], kind: str, whole: str) -> dict:
    """The JSON object in ``path`` whose ``"format"`` is ``fmt``; ``error`` if it is not valid JSON
    (``whole`` is corrupt) or not such an object (not ``kind``)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); the {whole} is corrupt") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not {kind} (no 'format': '{fmt}')")
    return data


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strictly valid JSON, atomically: NaN and infinities (which JSON has no
    literal for) are written as ``null``."""
    clean = finite_json(data)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(clean, f, indent=2, default=_json_default, allow_nan=False)
            f.write("\n")

    _atomic_write(Path(target), write)


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by ``None`` (tuples become lists)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return finite_json(obj.item())
    if isinstance(obj, np.generic):
        return finite_json(obj.item())
    return obj


def _json_default(obj):
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Save ``model`` (tensors + JSON sidecar); ``metadata`` (bits trained, method, ...) goes
    into the sidecar. Returns the tensors' path."""
    tensors_path, sidecar_path = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(getattr(model, "anybit_meta", {}) or {}),
        "precision": {n: list(p) for n, p in get_precision(model).items()} if quant_layers(model) else {},
        "switchable_bn": {n: m.active for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm)},
        "metadata": metadata,
    }
    _atomic_write(tensors_path, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    write_json(sidecar_path, sidecar)
    return tensors_path


PACKED_FORMAT = "anybit-packed"   # anybit.export's packed files (read by anybit.export.packed)
ONNX_FORMAT = "anybit-onnx"


def sidecar_format(path: str | os.PathLike) -> str | None:
    """The ``"format"`` of the JSON sidecar at ``path`` (a checkpoint, packed or ONNX export), if readable."""
    _, sidecar_path = checkpoint_paths(path)
    try:
        data = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def read_metadata(path: str | os.PathLike, packed: bool = False) -> dict:
    """The JSON sidecar of a checkpoint, validated, without loading any tensor. With ``packed`` the sidecar
    of a packed export (``anybit export``) is accepted too; otherwise it is refused with a message."""
    tensors_path, sidecar_path = checkpoint_paths(path)
    kind = sidecar_format(path)
    if kind == ONNX_FORMAT:
        raise CheckpointError(f"{path} holds an ONNX export (anybit export --format onnx): evaluate it with "
                              f"anybit eval {path} --onnx, or run it with anybit.export.onnx_session")
    if kind == PACKED_FORMAT:
        if not packed:
            raise CheckpointError(f"{path} is a packed export (anybit export), frozen at the precision it was "
                                  f"exported at; this command needs the checkpoint it was exported from")
        from .export.packed import read_packed_sidecar

        return read_packed_sidecar(path)
    if not tensors_path.is_file() or not sidecar_path.is_file():
        missing = [str(p) for p in (tensors_path, sidecar_path) if not p.is_file()]
        raise CheckpointNotFoundError(
            f"no anybit checkpoint at {path}: missing {', '.join(missing)} "
            f"(expected NAME.safetensors and NAME.json written by anybit.save or anybit train)"
        )
    sidecar = read_tagged_json(sidecar_path, FORMAT, CheckpointError, "an anybit checkpoint sidecar", "checkpoint")
    version = sidecar.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{sidecar_path} is corrupt: 'format_version' must be an integer; re-save the "
                              f"checkpoint (anybit.save) or restore the file")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{sidecar_path} has format version {sidecar['format_version']}, newer than this anybit "
            f"reads ({FORMAT_VERSION}); upgrade anybit"
        )
    _check_sidecar_types(sidecar, sidecar_path)
    return sidecar


def _check_sidecar_types(sidecar: dict, path: Path) -> None:
    """The fields anybit reads have the types it wrote (a hand-edited sidecar fails here, not deep inside)."""
    def bad(field: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt: {field} must be {expected}; re-save the checkpoint "
                               f"(anybit.save) or restore the file")

    model, meta = sidecar.get("model", {}), sidecar.get("metadata", {})
    for field, value in (("'model'", model), ("'metadata'", meta), ("'precision'", sidecar.get("precision", {})),
                         ("'switchable_bn'", sidecar.get("switchable_bn", {}))):
        if not isinstance(value, dict):
            raise bad(field, "an object")
    for key in ("quant_spec", "arch_kwargs"):
        if key in model and not isinstance(model[key], dict):
            raise bad(f"'model.{key}'", "an object")
    if "arch" in model and not isinstance(model["arch"], str):
        raise bad("'model.arch'", "a string")
    for name, pair in sidecar.get("precision", {}).items():
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(b) is int and b in VALID_BITS for b in pair)):
            raise bad(f"'precision.{name}'", "[weight bits, activation bits], each 1..16 or 32")
    for name, active in sidecar.get("switchable_bn", {}).items():
        if not isinstance(active, str):
            raise bad(f"'switchable_bn.{name}'", "a precision key such as \"4\"")
    data = meta.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("options", {}), dict):
        raise bad("'metadata.data'", '{"dataset": NAME, "options": {...}}')
    if not isinstance(meta.get("method", ""), str):
        raise bad("'metadata.method'", "a string")
    trained = meta.get("bits_trained", [])
    if not isinstance(trained, list) or not all(type(b) is int and b in VALID_BITS for b in trained):
        raise bad("'metadata.bits_trained'", "a list of bit-widths (1..16, 32)")
    members = meta.get("members")
    if members is not None and not (isinstance(members, dict) and members and all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) and v and "/" not in v and "\\" not in v
            and v not in (".", "..") for k, v in members.items())):
        raise bad("'metadata.members'", "an object {bits: checkpoint name in the same directory}")


def _build(sidecar: dict, path) -> nn.Module:
    from . import models

    info = sidecar.get("model", {})
    if "arch" not in info and isinstance(info.get("hf"), dict):
        return models.hf.build(info["hf"])
    if "arch" not in info:
        raise CheckpointError(
            f"checkpoint {path} does not name a registered architecture; pass the float model "
            f"to rebuild into: anybit.load(path, model=my_model)"
        )
    try:
        return models.create(info["arch"], **info.get("arch_kwargs", {}))
    except models.ModelConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its sidecar's 'model.arch_kwargs' do not build {info['arch']}: "
                              f"{e}; re-save the checkpoint or restore the file") from e


def _check_fit(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Missing tensors and shapes first, so that a checkpoint that does not fit leaves the model's tensors
    untouched (``load_state_dict`` copies every tensor that fits before it reports the others). Extra
    checkpoint tensors are judged by ``load_state_dict``: per-bit-width ranges are created on loading."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(f"{what}: {len(missing)} tensors missing (e.g. {missing[:3]})")
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}"
              for k, v in expected.items() if tuple(v.shape) != tuple(state[k].shape)]
    if shapes:
        raise CheckpointError(f"{what}: {len(shapes)} tensors differ in shape (e.g. {'; '.join(shapes[:3])})")


def _restore_pins(model: nn.Module, info: dict) -> None:
    """Pin the layers the saved conversion pinned (found by execution order when it was made, which a
    conversion here, without an example input, cannot repeat)."""
    spec, pinned = info.get("quant_spec", {}), info.get("conversion", {}).get("pinned")
    bits = spec.get("keep_first_last") if isinstance(spec, dict) else None
    if bits is None or not isinstance(pinned, list):
        return
    layers = quant_layers(model)
    if not all(isinstance(n, str) and n in layers for n in pinned):
        return   # the mismatch is reported by the checks below
    for name, layer in layers.items():
        layer.pinned = (bits, bits) if name in pinned else None


def load(path: str | os.PathLike, model: nn.Module | None = None, map_location: str | torch.device = "cpu",
         bits: int | None = None) -> nn.Module:
    """Load a checkpoint written by :func:`save`, or a packed export written by :func:`anybit.export`.

    Without ``model`` the architecture is rebuilt from the registry; with ``model`` (a float
    model of the same architecture, e.g. a torchvision network) the tensors are loaded into it.
    The model is converted with the saved quantization spec and restored to the saved precision,
    or set to ``bits``. A packed export loads at the precision it holds; an every-precision package
    at ``bits`` (required), exactly as the model it was exported from runs there.
    """
    if sidecar_format(path) == PACKED_FORMAT:
        from .export.packed import load_packed

        return load_packed(path, model, bits, map_location)
    sidecar = read_metadata(path)
    tensors_path, _ = checkpoint_paths(path)
    try:
        state = load_file(str(tensors_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tensors_path} could not be read as safetensors ({e}); the checkpoint is corrupt") from e

    if model is None:
        model = _build(sidecar, path)
    info = sidecar.get("model", {})
    if "quant_spec" in info and not quant_layers(model):
        try:
            spec = QuantSpec.from_dict(info["quant_spec"])
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {path}: its sidecar's 'model.quant_spec' is not valid ({e}); re-save "
                                  f"the checkpoint or restore the file") from e
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(model, spec)
        _restore_pins(model, info)
    arch = info.get("arch", "a custom model")
    mismatch = f"checkpoint {path} (architecture {arch}) does not fit this model"
    _check_fit(model.state_dict(), state, mismatch)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        detail = str(e).split("\n\t", 1)[-1][:300]
        raise CheckpointError(f"{mismatch}: {detail}") from e
    if result.unexpected_keys:
        raise CheckpointError(f"{mismatch}: {len(result.unexpected_keys)} unexpected tensors "
                              f"(e.g. {result.unexpected_keys[:3]})")
    model.anybit_meta = {**info, "checkpoint": sidecar.get("metadata", {})}
    saved_precision = {n: tuple(p) for n, p in sidecar.get("precision", {}).items()}
    if saved_precision:
        layers = quant_layers(model)
        unknown = sorted(set(saved_precision) - set(layers))
        if unknown:
            raise CheckpointError(f"checkpoint {path} (architecture {arch}) names layers this model lacks: {unknown[:3]}")
        for name, pair in saved_precision.items():  # exact per-layer state; pinned layers may differ
            layers[name].set_bits(*pair)
    if "switchable_bn" in sidecar:
        for name, active in sidecar["switchable_bn"].items():
            try:
                bn = model.get_submodule(name)
            except AttributeError:
                bn = None
            if not isinstance(bn, SwitchableBatchNorm):
                raise CheckpointError(f"checkpoint {path}: its sidecar names {name!r} as a switchable BatchNorm, "
                                      f"which this model does not have; re-save the checkpoint or restore the file")
            bn.active = active
    elif saved_precision:  # older sidecars: derive the active BatchNorms from the precision
        set_precision(model, saved_precision)
    if bits is not None:
        set_precision(model, bits)
    return model
