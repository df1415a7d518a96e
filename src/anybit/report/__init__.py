"""Tables, run records (``run.json``), CSV logs and plots."""

from .csvlog import CSVLog
from .plots import plot_accuracy_vs_bits
from .runinfo import RunRecorder, environment
from .tables import format_table

__all__ = ["CSVLog", "RunRecorder", "environment", "format_table", "plot_accuracy_vs_bits"]
