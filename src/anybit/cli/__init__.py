"""``anybit`` command line: thin wrappers that parse arguments, call the library and print."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import anybit

from . import eval_cmd, export_cmd, mixed_cmd, ptq_cmd, train_cmd
from .common import close_out_dirs

SUBCOMMANDS = [train_cmd, eval_cmd, mixed_cmd, ptq_cmd, export_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anybit",
        description="One PyTorch model, every precision: train for many bit-widths at once, "
                    "calibrate after training, allocate bits per layer, export what runs.",
    )
    parser.add_argument("--version", action="version", version=f"anybit {anybit.__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or bool(os.environ.get("ANYBIT_DEBUG"))
    succeeded = False
    try:
        status = args.func(args) or 0
        succeeded = status == 0
        return status
    except KeyboardInterrupt:
        print("anybit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError) as e:
        if debug:
            traceback.print_exc()
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"anybit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI must never end in a bare traceback
        if debug:
            traceback.print_exc()
        print(f"anybit {args.command}: internal error: {type(e).__name__}: {e} "
              f"(re-run with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1
    finally:
        close_out_dirs(succeeded)


if __name__ == "__main__":
    sys.exit(main())
