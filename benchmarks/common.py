"""Shared pieces of the benchmark scripts: presets and arguments, timing, results JSON and Markdown.

    from common import Stopwatch, add_common_args, apply_preset, command_line, write_markdown, write_results

A benchmark defines ``--quick`` (CPU, minutes) and ``--full`` (paper scale, GPU) presets as dicts; any
option given on the command line overrides its preset. Results go to ``benchmarks/results/<name>.json``
with the exact command and the environment; the summary table goes to ``docs/<page>.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
DOCS = ROOT.parent / "docs"

if str(ROOT.parent / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT.parent / "src"))

import anybit  # noqa: E402
from anybit.checkpoint import write_json  # noqa: E402
from anybit.evaluation import evaluate  # noqa: E402
from anybit.report import environment, format_table  # noqa: E402
from anybit.train import shared_bn_recalibrated  # noqa: E402


def load_data(args) -> tuple:
    """(train, un-augmented train for calibration, test) from ``args.dataset``/``data_dir``/``image_size``,
    with the fixed random ``train_subset``/``test_subset`` (0 = all) the benchmarks use."""
    options = {"image_size": args.image_size} if args.image_size else {}
    train = anybit.data.load(args.dataset, "train", data_dir=args.data_dir, **options)
    calib = anybit.data.load(args.dataset, "train", data_dir=args.data_dir, augment=False, **options)
    test = anybit.data.load(args.dataset, "test", data_dir=args.data_dir, **options)
    if args.train_subset:
        train, calib = train.subset(args.train_subset, seed=args.seed), calib.subset(args.train_subset, seed=args.seed)
    if args.test_subset:
        test = test.subset(args.test_subset, seed=args.seed)
    return train, calib, test


def bn_reestimated_accuracy(model, calib_loader, test_loader, bits: Iterable[int], device,
                            batches: int = 20) -> dict[str, float]:
    """Test top-1 of a shared-BN model at each of ``bits`` with its BatchNorm statistics re-estimated at
    that bit-width (``batches`` batches of ``calib_loader``): how much of its accuracy the one shared set
    of statistics costs. The model's own statistics are restored afterwards."""
    out = {}
    for b in bits:
        with shared_bn_recalibrated(model, calib_loader, b, batches=batches, device=device), \
                anybit.precision(model, b):
            out[str(b)] = evaluate(model, test_loader, device, quiet=True)["accuracy"]
    return out


def add_common_args(p: argparse.ArgumentParser) -> None:
    """``--quick``/``--full`` presets and the options every benchmark has."""
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small CPU setting (minutes)")
    mode.add_argument("--full", action="store_true", help="paper-scale setting (a GPU machine)")
    p.add_argument("--data-dir", help="dataset directory (CIFAR in torchvision layout for --full)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads; 0 = torch's default (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result file name (<name>-<tag>.json)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the docs page")


def add_training_run_args(p: argparse.ArgumentParser, bits_help: str) -> None:
    """The options of a benchmark's training runs; left unset, they come from the preset."""
    p.add_argument("--dataset")
    p.add_argument("--image-size", type=int, help="Fashion-MNIST image size, >= 28 (0 = the dataset's default)")
    p.add_argument("--model")
    p.add_argument("--width", type=float)
    p.add_argument("--bits", help=bits_help)
    p.add_argument("--epochs", type=int)
    p.add_argument("--train-subset", type=int, help="training samples (0 = all)")
    p.add_argument("--test-subset", type=int, help="test samples (0 = all)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)


def fill_preset(args: argparse.Namespace, preset: dict) -> argparse.Namespace:
    """Options left unset (None) take the preset's value."""
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def apply_preset(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
    """Fill options left unset (None) from the ``--full`` preset, else the ``--quick`` one."""
    fill_preset(args, full if args.full else quick)
    args.mode = "full" if args.full else "quick" if args.quick else "custom"
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The exact command that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"benchmarks/{Path(script).name}", *(shlex.quote(a) for a in args)])


class Stopwatch:
    """Wall-clock and process CPU seconds of a block (CUDA synchronised at both ends).

    ``with Stopwatch(device) as sw: ...`` then ``sw.wall``, ``sw.cpu``. CPU time is less sensitive than
    wall time to other work on a shared machine; both are reported.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.cuda:
            torch.cuda.synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def to_dict(self) -> dict:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def write_results(name: str, report: dict[str, Any], tag: str = "") -> Path:
    """``benchmarks/results/<name>[-<tag>].json`` with the environment added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-{tag}.json" if tag else f"{name}.json")
    report = {**report, "environment": report.get("environment") or environment()}
    write_json(path, report)
    return path


def write_markdown(page: str, lines: Iterable[str]) -> Path:
    """Write ``docs/<page>`` from lines of Markdown."""
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / page
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    return format_table(headers, rows, markdown=True)


def fmt(value, spec: str = ".2f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None
