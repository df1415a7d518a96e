"""Append-only CSV logs (one row per epoch and bit-width), safe to continue after a resume."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


class CSVLog:
    """Rows with fixed columns appended to ``path``; the header is written once, when the file is new."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)

    def append(self, rows: Iterable[Mapping]) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(row.get(k)) for k in self.columns})

    def rewrite(self, rows: Iterable[Mapping]) -> None:
        """Replace the file with ``rows`` (used on resume, to drop rows of an epoch that did not finish),
        atomically: an interruption leaves the old file or the new one, never a half-written one."""
        from ..checkpoint import _atomic_write

        rows = list(rows)

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: _fmt(row.get(k)) for k in self.columns})

        _atomic_write(self.path, write)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
