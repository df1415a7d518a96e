"""``anybit`` command line: thin wrappers that parse arguments, call the library and print.

One error path for every command (:func:`main`): a usage mistake, a bad value, a missing or corrupt
file and an operating-system error (full disk, read-only directory) print one line
``anybit COMMAND: error: ...`` and exit with status 2; Ctrl-C and SIGTERM print one line and exit
with 130 / 143; anything else is an internal error (status 1). Output directories opened by the
command are closed by the same path (:func:`~anybit.cli.outdir.close_out_dirs`): kept when the
command succeeded, rolled back when it did not. Nothing heavy (torch) is imported before
:func:`main` has installed its handlers, so even Ctrl-C during start-up prints one line.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import sys
import traceback
import warnings
from contextlib import contextmanager

from .errors import UsageError
from .outdir import (Interrupted, close_out_dirs, install_signal_handlers, open_out_dirs, restore_signal_handlers,
                     signal_raised)

EXIT_USAGE = 2
EXIT_INTERNAL = 1


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``anybit train: error: ... (see anybit train --help)``."""

    def error(self, message: str):  # noqa: D102 - argparse's hook: raise into main's one error path
        raise UsageError(f"{message} (see {self.prog} --help)", self.prog)


def build_parser() -> argparse.ArgumentParser:
    import anybit

    from . import eval_cmd, export_cmd, mixed_cmd, ptq_cmd, train_cmd

    parser = Parser(
        prog="anybit",
        description="One PyTorch model, every precision: train for many bit-widths at once, "
                    "calibrate after training, allocate bits per layer, export what runs.",
    )
    parser.add_argument("--version", action="version", version=f"anybit {anybit.__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in (train_cmd, eval_cmd, mixed_cmd, ptq_cmd, export_cmd):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    state = {"command": None, "debug": bool(os.environ.get("ANYBIT_DEBUG"))}
    with _signals(), _one_line_warnings(state):
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            state["command"], state["debug"] = args.command, state["debug"] or args.debug
            if extra:   # named after the command, not the top-level parser
                prog = f"anybit {args.command}" if args.command else "anybit"
                raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see {prog} --help)", prog)
            if not getattr(args, "func", None):
                parser.print_help()
                return EXIT_USAGE
            status = args.func(args) or 0
        except SystemExit:          # argparse: --help and --version
            close_out_dirs(False)
            raise
        except BaseException as e:  # noqa: BLE001 - the CLI must never end in a bare traceback
            notes = close_out_dirs(False, resumable=getattr(e, "resumable", True))
            return _report(e, state, notes)
        notes = close_out_dirs(status == 0)
        for note in notes:
            print(f"{_prog(state)}: {note}", file=sys.stderr)
        return status


def _prog(state: dict) -> str:
    return f"anybit {state['command']}" if state["command"] else "anybit"


def exit_status(error: type[BaseException]) -> int:
    """The exit status the command line gives for an error of this type (docs/errors.md lists them all)."""
    if issubclass(error, KeyboardInterrupt):
        return 128 + int(signal.SIGINT) if not issubclass(error, Interrupted) else 128 + int(signal.SIGTERM)
    if issubclass(error, (UsageError, OSError, ValueError, MemoryError)):
        return EXIT_USAGE
    return EXIT_INTERNAL


def _report(e: BaseException, state: dict, notes: list[str]) -> int:
    """Print the one line for ``e`` and return the exit status."""
    if state["debug"] and not isinstance(e, KeyboardInterrupt):
        traceback.print_exc()
    tail = "".join(f"; {n}" for n in notes)
    if isinstance(e, KeyboardInterrupt) or signal_raised() is not None:
        signum = e.signum if isinstance(e, Interrupted) else (signal_raised() or signal.SIGINT)
        print(f"{_prog(state)}: interrupted ({signal.Signals(signum).name}){tail}", file=sys.stderr)
        return 128 + int(signum)
    if isinstance(e, UsageError):
        print(f"{e.prog}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, OSError) and e.errno is not None:
        print(f"{_prog(state)}: error: {_os_message(e)}{tail}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, (ValueError, FileNotFoundError)):
        print(f"{_prog(state)}: error: {one_line(str(e))}{tail}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(e, MemoryError):
        print(f"{_prog(state)}: error: out of memory; use smaller settings (--batch-size, --width, "
              f"subsets){tail}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{_prog(state)}: internal error: {type(e).__name__}: {one_line(str(e))[:400]} (re-run with --debug "
          f"for the traceback, and please report it){tail}", file=sys.stderr)
    return EXIT_INTERNAL


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with "; " (list markers dropped)."""
    parts = [re.sub(r"^[-*] ", "", p.strip()) for p in str(text).splitlines()]
    return "; ".join(p for p in parts if p)


_OS_HINTS = {
    errno.ENOSPC: "free some space or give another --out",
    errno.EDQUOT: "free some space or give another --out",
    errno.EROFS: "give a writable --out",
    errno.EACCES: "check the permissions or give another path",
    errno.EPERM: "check the permissions or give another path",
}


def _os_message(e: OSError) -> str:
    """``no space left on device writing runs/x/model.safetensors; free some space ...``."""
    what = (e.strerror or os.strerror(e.errno)).rstrip(".")
    what = what[0].lower() + what[1:] if what else what
    target = e.filename or next(iter(open_out_dirs()), None)
    verb = getattr(e, "anybit_action", None) or ("writing" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
                                                else "at")
    where = f" {verb} {target}" if target is not None else ""
    hint = _OS_HINTS.get(e.errno)
    return f"{what}{where}" + (f"; {hint}" if hint else "")


@contextmanager
def _signals():
    """SIGINT, SIGTERM and SIGHUP raise in the main thread while a command runs (held back while output
    directories are being renamed)."""
    previous = install_signal_handlers()
    try:
        yield
    finally:
        restore_signal_handlers(previous)


@contextmanager
def _one_line_warnings(state: dict):
    """Warnings print as one line, ``anybit COMMAND: warning: ...``."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{_prog(state)}: warning: {one_line(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


if __name__ == "__main__":
    sys.exit(main())
