"""Training state for ``--resume``: tensors in safetensors, everything else in JSON, never pickle.

A state is a nested structure of dicts, lists, tuples, numbers, strings, tensors and numpy arrays
(model, optimizer and sampler state dicts, RNG states, the run history). :func:`flatten` replaces
every tensor with a reference into a flat ``{key: tensor}`` map that safetensors stores; the rest is
JSON. The tensors file is named after the epoch and written first, then the JSON that points at it,
each atomically; so an interruption at any moment leaves the previous complete state readable.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, _atomic_write, read_tagged_json, write_json

STATE_DIR = "state"
STATE_JSON = "state.json"
STATE_FORMAT = "anybit-train-state"


class ResumeError(ValueError):
    """A run that cannot be resumed (no state, a corrupt state, or a different configuration)."""


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "s") -> Any:
    """JSON-able copy of ``obj`` with tensors moved into ``tensors`` (keyed by their path)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iu"
                                                                            else np.float64))
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a training state (at {prefix})")


def unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__items__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    return obj


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) random generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in state["cuda"]])


def save_state(out_dir: str | os.PathLike, epoch: int, state: dict) -> Path:
    """Write the state after ``epoch`` epochs to ``out_dir/state/`` atomically; returns the JSON path."""
    directory = Path(out_dir) / STATE_DIR
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(state, tensors)
    tensors_name = f"state-epoch{epoch}.safetensors"
    _atomic_write(directory / tensors_name, lambda tmp: save_file(tensors, tmp, metadata={"format": STATE_FORMAT}))
    write_json(directory / STATE_JSON, {"format": STATE_FORMAT, "epoch": epoch, "tensors": tensors_name,
                                        "state": tree})
    for old in directory.glob("state-epoch*.safetensors"):
        if old.name != tensors_name:
            old.unlink(missing_ok=True)
    return directory / STATE_JSON


def has_state(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / STATE_DIR / STATE_JSON).is_file()


def read_state_header(out_dir: str | os.PathLike) -> dict:
    """The JSON part of a saved state (configuration, epoch, history), without loading tensors."""
    path = Path(out_dir) / STATE_DIR / STATE_JSON
    if not path.is_file():
        raise ResumeError(f"there is no training state to resume in {out_dir} (no {path}); "
                          f"start the run without --resume, or with --overwrite to replace the directory")
    header = read_tagged_json(path, STATE_FORMAT, ResumeError, "an anybit training state", "training state")
    _check_header(header, path)
    return header


def _check_header(header: dict, path: Path) -> None:
    """The fields :func:`load_state` and the trainer read have the types and ranges anybit wrote (a
    hand-edited or damaged state fails here with a message, not deep inside the trainer)."""
    def bad(what: str) -> ResumeError:
        return ResumeError(f"{path} is corrupt: {what}; the training state cannot be resumed. Start the run "
                           f"again (--overwrite), or restore the file")

    state = header.get("state")
    if not isinstance(state, dict):
        raise bad("'state' must be an object")
    config = state.get("config")
    if not isinstance(config, dict):
        raise bad("'state.config' must be an object")
    for key in ("history", ):
        if not isinstance(state.get(key), list):
            raise bad(f"'state.{key}' must be a list")
    for key in ("timings", "samples"):
        if not isinstance(state.get(key), dict):
            raise bad(f"'state.{key}' must be an object")
    epochs = config.get("epochs")
    epoch = header.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(epochs, int) \
            or not 0 <= epoch <= epochs:
        raise bad(f"'epoch' is {epoch!r}, expected an epoch count in 0..{epochs!r} (the run's epochs)")
    if len(state["history"]) != epoch:
        raise bad(f"'epoch' is {epoch} but the history holds {len(state['history'])} epochs")
    tensors = header.get("tensors")
    if not isinstance(tensors, str) or not re.fullmatch(r"state-epoch[0-9]+\.safetensors", tensors):
        raise bad(f"'tensors' is {tensors!r}, expected a file name state-epochN.safetensors in {path.parent}")


def load_state(out_dir: str | os.PathLike) -> tuple[int, dict]:
    """``(epochs done, state)`` saved by :func:`save_state`."""
    header = read_state_header(out_dir)
    tensors_path = Path(out_dir) / STATE_DIR / header["tensors"]
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{tensors_path} could not be read ({e}); the training state is corrupt") from e
    try:
        state = unflatten(header["state"], tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ResumeError(f"{tensors_path.parent / STATE_JSON} is corrupt: it refers to tensors or values that are "
                          f"not in {tensors_path.name} ({type(e).__name__}: {e}); start the run again "
                          f"(--overwrite)") from e
    missing = [k for k in ("models", "optimizer", "schedule", "sampler", "rng") if not isinstance(state.get(k), dict)]
    if missing:
        raise ResumeError(f"{tensors_path.parent / STATE_JSON} is corrupt: {', '.join(missing)} missing; start the run "
                          f"again (--overwrite)")
    return header["epoch"], state
