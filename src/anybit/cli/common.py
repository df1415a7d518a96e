"""Pieces shared by the subcommands: common options, output directories, device and data."""

from __future__ import annotations

import argparse
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


class CLIError(ValueError):
    """A command-line usage error; printed without a traceback, exit status 2."""


def add_data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--dataset", required=required,
                   help="fashion-mnist, cifar10, cifar100, imagefolder or synthetic")
    p.add_argument("--data-dir", help="directory holding the dataset (default: $ANYBIT_DATA, then system paths)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default: %(default)s)")


def add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", required=out_required, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines")


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {expected}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "0 or more")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device: expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_out_dir(path: str | os.PathLike, overwrite: bool, resume: bool = False,
                    can_resume: bool = False) -> Path:
    """Create the output directory; refuse to reuse a non-empty one unless told to (overwrite/resume)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    if overwrite and resume:
        raise CLIError("--overwrite and --resume contradict each other: choose one")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise CLIError(
                f"output directory {out} already exists and is not empty; pass --overwrite to replace it"
                + (" or --resume to continue it" if can_resume else "")
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
