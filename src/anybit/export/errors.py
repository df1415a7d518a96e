"""Errors of the export stage: every one a ``ValueError`` the command line prints in one line (exit 2)."""

from __future__ import annotations

from ..checkpoint import CheckpointError


class ExportError(ValueError):
    """A model, precision or option that cannot be exported (the message says what to do instead)."""


class ExportFileError(CheckpointError):
    """An export file that is missing, truncated or corrupt, or does not fit the model it is loaded into."""
