"""Runs ``anybit`` commands in one process of a ``torchrun`` job (or in a plain process), for
tests/test_distributed.py.

It registers a tiny network without BatchNorm (``tiny-nobn``: per-rank batch statistics would make a
two-process run differ from a one-process one by design), joins the process group once, runs every
command given as a JSON list of argument lists, and can make one rank fail at the start of an epoch
(``--fail RANK:EPOCH``), make one rank's losses NaN (``--nan RANK:EPOCH``) or give one rank more arguments
in one command (``--rank-args RANK INDEX JSON``).

    torchrun --standalone --nproc-per-node 2 tests/dist_driver.py '[["train", ...]]'
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
from torch import nn

import anybit.models
from anybit.cli import main
from anybit.train import trainer as trainer_module


class TinyNoBN(nn.Module):
    """conv - relu - conv - relu - pool - linear: quantizable layers, no BatchNorm."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = max(2, int(8 * width))
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, stride=2)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def register() -> None:
    anybit.models.register("tiny-nobn", TinyNoBN)


def inject_failure(rank: int, epoch: int) -> None:
    """Rank ``rank`` raises when it starts epoch ``epoch`` (0-based): a process that crashes mid-run."""
    original = trainer_module.MultiBitTrainer._train_epoch

    def failing(self, e):
        if self.dist.rank == rank and e == epoch:
            print(f"failing at {time.time():.3f}", file=sys.stderr, flush=True)
            raise RuntimeError(f"injected failure on rank {rank} at epoch {epoch + 1}")
        return original(self, e)

    trainer_module.MultiBitTrainer._train_epoch = failing


def inject_nan(rank: int, epoch: int) -> None:
    """Rank ``rank``'s step losses read as NaN from epoch ``epoch`` (0-based) on: a divergence only one rank sees."""
    original = trainer_module.MultiBitTrainer._train_epoch

    def diverging(self, e):
        if self.dist.rank == rank and e >= epoch and not getattr(self.step, "nan_injected", False):
            run_bit = self.step.run_bit

            def nan_bit(*args, **kwargs):
                result = run_bit(*args, **kwargs)
                result.loss = result.loss * float("nan")
                return result

            self.step.run_bit, self.step.nan_injected = nan_bit, True
        return original(self, e)

    trainer_module.MultiBitTrainer._train_epoch = diverging


def run(commands: list[list[str]]) -> int:
    """Every command in turn (a failing one does not stop the others); the first non-zero status."""
    register()
    statuses = [main(argv) for argv in commands]
    return next((s for s in statuses if s), 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("commands")
    parser.add_argument("--fail", help="RANK:EPOCH")
    parser.add_argument("--nan", help="RANK:EPOCH: that rank's losses are NaN from that epoch on")
    parser.add_argument("--rank-args", nargs=3, metavar=("RANK", "INDEX", "JSON"),
                        help="extra arguments for one rank in command INDEX")
    args = parser.parse_args()
    torch.set_num_threads(1)
    commands = json.loads(args.commands)
    rank = int(os.environ.get("RANK", 0))
    if args.rank_args and int(args.rank_args[0]) == rank:
        commands[int(args.rank_args[1])] += json.loads(args.rank_args[2])
    if args.fail:
        inject_failure(*(int(v) for v in args.fail.split(":")))
    if args.nan:
        inject_nan(*(int(v) for v in args.nan.split(":")))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:   # one process group for all the commands
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        sys.exit(run(commands))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
