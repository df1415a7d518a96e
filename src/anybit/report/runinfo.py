"""``run.json``: the configuration, environment, metrics and timings of one run."""

from __future__ import annotations

import os
import platform
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_json


def environment() -> dict:
    """Versions and hardware that a result depends on."""
    import anybit

    env = {
        "anybit": anybit.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


class RunRecorder:
    """Collects config, metrics and phase timings; :meth:`write` saves them to ``out_dir/run.json``."""

    def __init__(self, out_dir: str | os.PathLike, command: str, config: dict[str, Any]) -> None:
        self.path = Path(out_dir) / "run.json"
        self.data: dict[str, Any] = {
            "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "environment": environment(),
            "timings_s": {},
            "metrics": {},
        }

    @contextmanager
    def timed(self, phase: str):
        """Add the wall time of the block to ``timings_s[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            timings = self.data["timings_s"]
            timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start

    def add_time(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``timings_s[phase]`` (for work timed elsewhere, or restored on resume)."""
        timings = self.data["timings_s"]
        timings[phase] = timings.get(phase, 0.0) + float(seconds)

    def write(self) -> Path:
        self.data["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(self.path, self.data)
        return self.path
