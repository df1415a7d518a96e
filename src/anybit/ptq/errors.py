"""Errors of post-training quantization; the CLI prints their messages and exits 2."""

from __future__ import annotations


class PTQError(ValueError):
    """A post-training quantization setting or input that cannot work."""


class CalibrationDataError(PTQError):
    """Calibration data that is empty, too small, or not made of input tensors."""


class CacheTooLargeError(PTQError):
    """AdaQuant would need to hold more layer inputs/outputs in memory than allowed."""
