"""Command-line side of several processes (``torchrun``): the options, and joining the job."""

from __future__ import annotations

import argparse
import os

from anybit.train.distributed import DEFAULT_TIMEOUT_S, DistContext, init_distributed, launched_by_torchrun

from .common import CLIError, positive_float, resolve_device, strict_int

IN_MEMORY_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "synthetic")
MAX_WORKERS = 256           # data-loading processes per training process


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a process waits for the others at any synchronisation before "
                        "the job fails (default: %(default)g)")


def start(args: argparse.Namespace) -> DistContext:
    """This process's context: one of the job's ranks under torchrun, else a context of one rank on --device."""
    if not args.dist_timeout > 0:
        raise CLIError(f"--dist-timeout {args.dist_timeout:g} must be a positive number of seconds")
    if not launched_by_torchrun():
        return DistContext(device=resolve_device(args.device), timeout_s=args.dist_timeout)
    device = resolve_device(args.device)   # validates the name; each rank then takes cuda:LOCAL_RANK
    if device.type == "cuda" and args.device != "auto" and device.index is not None:
        raise CLIError(f"--device {args.device} names one GPU, but under torchrun each process takes "
                       f"cuda:LOCAL_RANK: give --device cuda (or auto)")
    return init_distributed(device.type, args.dist_timeout)


def workers_arg(text: str) -> int | str:
    """``--workers``: ``auto`` or a number of processes."""
    if text.strip() == "auto":
        return "auto"
    value = strict_int(text, "'auto' or a number of processes")
    if not 0 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more (and at most {MAX_WORKERS})")
    return value


def auto_workers(dataset: str | None, processes_per_node: int = 1) -> int:
    """Data-loading processes for ``--workers auto``: none for the datasets held in memory (their batched
    transform costs less than handing batches between processes); for files (imagefolder), the cores a
    training process has, less one for itself, at most 8."""
    if dataset in IN_MEMORY_DATASETS:
        return 0
    cores = (os.cpu_count() or 1) // max(1, processes_per_node)
    return max(1, min(8, cores - 1))
