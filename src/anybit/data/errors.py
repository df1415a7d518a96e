"""Errors raised while finding and reading datasets; the CLI prints their messages and exits 2."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched directories."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is corrupt, truncated, unsafe or not in the expected format."""


class UnknownDatasetError(ValueError):
    """A dataset name that anybit does not know."""
