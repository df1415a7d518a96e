"""Progress bars that stay quiet when output is not a terminal or when asked to."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable, desc: str = "", quiet: bool = False, total: int | None = None, leave: bool = False):
    """Wrap ``iterable`` in a tqdm bar unless ``quiet`` or stderr is not a TTY."""
    disable = quiet or not sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=disable, leave=leave, dynamic_ncols=True)
