"""Pieces shared by the subcommands: the validation layer for option values (argparse types that
check bounds before anything is built), common options, device and data."""

from __future__ import annotations

import argparse
import math
import os
import random
import re

import numpy as np
import torch

from .errors import CLIError
from .outdir import MARKER as OUTPUT_MARKER
from .outdir import check_out_path, close_out_dirs, prepare_out_dir

__all__ = ["CLIError", "OUTPUT_MARKER", "check_out_path", "close_out_dirs", "prepare_out_dir"]

MAX_COUNT = 2**31 - 1        # the largest count (samples, batches, steps) an option takes
MAX_SEED = 2**32 - 1
_INT = re.compile(r"[+-]?[0-9]+\Z")   # ASCII digits only: no "1_6", no non-ASCII digits, no spaces


# ---------------------------------------------------------------------- option types (argparse)
def strict_int(text: str, what: str = "an integer") -> int:
    """``int(text)`` for plain ASCII decimal integers only (``int`` also takes ``1_6`` and ``٤``)."""
    if not isinstance(text, str) or not _INT.match(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return int(text)


def _int_in(text: str, minimum: int, maximum: int, expected: str) -> int:
    value = strict_int(text)
    if not minimum <= value <= maximum:
        raise argparse.ArgumentTypeError(f"{value} must be {expected}")
    return value


def positive_int(text: str) -> int:
    return _int_in(text, 1, MAX_COUNT, f"at least 1 (and at most {MAX_COUNT})")


def non_negative_int(text: str) -> int:
    return _int_in(text, 0, MAX_COUNT, f"0 or more (and at most {MAX_COUNT})")


def seed_int(text: str) -> int:
    return _int_in(text, 0, MAX_SEED, f"a seed in 0..{MAX_SEED}")


def bits_int(text: str) -> int:
    """A bit-width (1..16 or 32), checked by the caller with the flag's name."""
    return strict_int(text, "a bit-width (1..16 or 32)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def fraction(text: str) -> float:
    """A fraction in (0, 1]."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in (0, 1], e.g. 0.15")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def non_empty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# ---------------------------------------------------------------------- common options
def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--dataset", required=required,
                   help="fashion-mnist, cifar10, cifar100, imagefolder or synthetic")
    p.add_argument("--data-dir", type=non_empty,
                   help="directory holding the dataset; when given, only it is used (default: $ANYBIT_DATA, then "
                        "system paths)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="mini-batch size (default: %(default)s)")


def add_data_option_arg(p: argparse.ArgumentParser, default_text: str) -> None:
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dataset option, repeatable (e.g. image_size=28, augment=false; {default_text})")


def add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", required=out_required, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing anybit output directory (the old one is kept until this run completes)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: %(default)s)")
    add_device_args(p)


MIXED_CALIB_SIZE = 512   # anybit mixed's calibration set; eval --bit-map calibrates on the same images


def add_test_subset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-subset", "--test-size", dest="test_subset", type=positive_int, metavar="N",
                   help="evaluate on a fixed random subset of N test samples (default: the whole test split)")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def parse_data_options(items: list[str], flag: str = "--data-option", example: str = "image_size=28") -> dict:
    """``["num_samples=512", "augment=false"]`` → ``{"num_samples": 512, "augment": False}``: plain
    integers, finite numbers and true/false are converted; the dataset checks names and ranges.
    ``flag``/``example`` name the option in messages (``--model-option`` parses the same way)."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise CLIError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} {example})")
        value: object = text
        if _INT.match(text):
            value = int(text)
        elif text.lower() in _BOOLS:
            value = _BOOLS[text.lower()]
        else:
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None:
                if not math.isfinite(number):
                    raise CLIError(f"{flag} {item!r}: {text!r} is not a finite number")
                value = number
        options[key] = value
    return options


def load_split(name: str, split: str, data_dir: str | None, options: dict, augment: bool | None = None):
    """``anybit.data.load`` for a command: the ``augment`` dataset option (``--data-option augment=false``)
    applies to the train split only; ``augment`` given here (calibration data: False) wins over it."""
    from anybit import data as anydata

    options = dict(options)
    option = options.pop("augment", None)
    if augment is None and split == "train":
        augment = option
    return anydata.load(name, split, data_dir=data_dir, augment=augment, **options)


def data_inputs(data_dir: str | None) -> list[str]:
    """Directories a command reads data from (its ``--data-dir`` and ``$ANYBIT_DATA``): an ``--out``
    that holds one of them is refused."""
    from anybit.data.registry import ENV_VAR

    dirs = [data_dir] if data_dir else []
    return dirs + [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]


def subset_of(dataset, n: int | None, flag: str, seed: int, default: int | None = None):
    """A fixed random subset of ``n`` samples of ``dataset``; when ``n`` is None, of ``default`` samples
    or all of them if the split is smaller (no ``default``: all of it). Asking for more samples than the
    split has is an error, not a silent use of fewer."""
    if n is None:
        return dataset if default is None else dataset.subset(min(default, len(dataset)), seed=seed)
    if n > len(dataset):
        split = f"{getattr(dataset, 'name', 'dataset')} {getattr(dataset, 'split', '')}".rstrip()
        raise CLIError(f"{flag} {n} is larger than the {split} split ({len(dataset)} samples): "
                       f"use at most {len(dataset)}, or leave {flag} out to use all of it")
    return dataset.subset(n, seed=seed)


def data_source(*datasets) -> dict:
    """Where each split was read from (recorded in run.json)."""
    return {getattr(d, "split", str(i)): getattr(d, "source", None) for i, d in enumerate(datasets)}


def check_model_fits(model: torch.nn.Module, dataset) -> None:
    """The checkpoint's classes and input channels match the dataset's (else a clear CLIError instead of
    a shape error deep inside the first forward pass)."""
    name = getattr(dataset, "name", "the dataset")
    classes = getattr(model, "anybit_meta", {}).get("arch_kwargs", {}).get("num_classes")
    if classes is not None and classes != getattr(dataset, "num_classes", classes):
        raise CLIError(f"the checkpoint predicts {classes} classes but {name} has {dataset.num_classes}; "
                       f"use the dataset it was trained for (--dataset, --data-option)")
    size = getattr(model, "anybit_meta", {}).get("arch_kwargs", {}).get("image_size")
    data_size = getattr(dataset, "image_size", None)
    if size is not None and data_size is not None and size != data_size:
        raise CLIError(f"the checkpoint takes {size}x{size} images but {name} gives {data_size}x{data_size}; use the "
                       f"image size it was trained with (--data-option image_size={size})")
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    channels = getattr(dataset, "in_channels", None)
    if first_conv is not None and channels is not None and first_conv.in_channels != channels:
        raise CLIError(f"the checkpoint takes {first_conv.in_channels}-channel images but {name} has {channels} "
                       f"channel(s); use the dataset it was trained for (--dataset, --data-option)")


def resolve_device(name: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N (checked against the GPUs present) or auto."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise CLIError(f"--device {name!r} is not a device: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise CLIError(f"--device {name!r}: anybit runs on cpu or cuda (cuda:N); use --device cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
