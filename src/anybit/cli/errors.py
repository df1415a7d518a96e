"""The command line's own error type (no heavy imports: the CLI loads it before torch)."""

from __future__ import annotations


class CLIError(ValueError):
    """A command-line usage error; printed without a traceback, exit status 2."""


class UsageError(CLIError):
    """An argparse error (unknown option, a value its type refused); ``prog`` is the command, e.g. ``anybit train``."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog
