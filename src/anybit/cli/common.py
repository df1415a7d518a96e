"""Pieces shared by the subcommands: common options, output directories, device and data."""

from __future__ import annotations

import argparse
import os
import random
import shutil
from dataclasses import dataclass
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


def add_data_option_arg(p: argparse.ArgumentParser, default_text: str) -> None:
    p.add_argument("--data-option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"dataset option, repeatable (e.g. image_size=28; {default_text})")


def add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out", required=out_required, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    add_device_args(p)


MIXED_CALIB_SIZE = 512   # anybit mixed's calibration set; eval --bit-map calibrates on the same images


def add_test_subset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-subset", "--test-size", dest="test_subset", type=positive_int, metavar="N",
                   help="evaluate on a fixed random subset of N test samples (default: the whole test split)")


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


OUTPUT_MARKER = ".anybit-output"   # written into every output directory: what --overwrite may replace


@dataclass
class _OpenOutput:
    path: Path
    made_here: bool            # the directory did not exist (or was replaced) before this command
    replaced: Path | None      # the previous contents, moved aside until the command succeeds


_OPEN_OUTPUTS: list[_OpenOutput] = []


def prepare_out_dir(path: str | os.PathLike, overwrite: bool, resume: bool = False,
                    can_resume: bool = False, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Create the output directory; refuse to reuse a non-empty one unless told to (overwrite/resume).

    ``--overwrite`` replaces only a directory anybit wrote (it holds the output marker or a run.json),
    never the current directory, one of its parents or the home directory, and only once the command
    succeeds: until then the old contents are kept aside, and they come back if it fails
    (:func:`close_out_dirs`). A directory that is or holds one of ``inputs`` is refused.
    """
    out = check_out_path(path, inputs)
    if overwrite and resume:
        raise CLIError("--overwrite and --resume contradict each other: choose one")
    made_here, replaced = not out.exists(), None
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise CLIError(
                f"output directory {out} already exists and is not empty; pass --overwrite to replace it"
                + (" or --resume to continue it" if can_resume else "")
            )
        _check_replaceable(out)
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(replaced)
        made_here = True
    out.mkdir(parents=True, exist_ok=True)
    if made_here or not any(out.iterdir()):
        (out / OUTPUT_MARKER).write_text("written by anybit; --overwrite may replace this directory\n")
    _OPEN_OUTPUTS.append(_OpenOutput(out, made_here, replaced))
    return out


def check_out_path(path: str | os.PathLike, inputs=()) -> Path:
    """``--out`` as a Path: refused if it is a file, or is or contains one of the command's ``inputs``."""
    out = Path(path)
    resolved = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            raise CLIError(f"--out {out} holds this command's input {item}; writing there would replace it. "
                           f"Give another --out")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory; give a directory path (it is created if missing)")
    return out


def _check_replaceable(out: Path) -> None:
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise CLIError(f"--out {out} is the current directory, one of its parents or the home directory; "
                       f"--overwrite would delete it. Give a directory of its own for --out")
    if not ((out / OUTPUT_MARKER).is_file() or (out / "run.json").is_file()):
        entries = sorted(p.name for p in out.iterdir())
        raise CLIError(f"--out {out} is not empty and is not an anybit output directory (it holds "
                       f"{', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); --overwrite replaces only "
                       f"directories anybit wrote. Choose another --out, or empty it yourself")


def close_out_dirs(succeeded: bool) -> None:
    """After a command: drop replaced contents when it succeeded. When it failed, remove the partial
    output and put the replaced contents back, unless the output holds a training state that
    ``--resume`` can continue (then it is kept, and what it replaced is dropped)."""
    while _OPEN_OUTPUTS:
        o = _OPEN_OUTPUTS.pop()
        keep = succeeded or (o.path / "state").is_dir() or not o.made_here
        if not keep:
            shutil.rmtree(o.path, ignore_errors=True)
            if o.replaced is not None:
                o.replaced.rename(o.path)
        elif o.replaced is not None:
            shutil.rmtree(o.replaced, ignore_errors=True)
