"""Errors of the model registry (a ValueError: the CLI prints the message and exits 2)."""

from __future__ import annotations


class UnknownModelError(ValueError):
    """A model name that is not in the registry."""


class ModelConfigError(ValueError):
    """Architecture arguments (width, classes, input channels) outside what the model can be built with."""
