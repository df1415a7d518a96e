"""Write docs/errors.md from the code: the exit statuses of the one error path, every anybit error type
with the status it gets, and the line each bad-input case of tests/cli_cases.py prints (run in-process,
as the tests do). ``--check`` compares the error-type table with the file instead of writing it (the
test suite checks both tables: tests/test_cli_cases.py).

    python scripts/errors_doc.py            # rewrite docs/errors.md
    python scripts/errors_doc.py --check
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

DOC = ROOT / "docs" / "errors.md"
TYPES = ("<!-- errors:types:begin -->", "<!-- errors:types:end -->")
CASES = ("<!-- errors:cases:begin -->", "<!-- errors:cases:end -->")

INTRO = """# Errors: what each kind of mistake gets

Every command runs through one error path (`anybit.cli.main`). A mistake prints **one line** on stderr,
`anybit COMMAND: error: what was wrong, what was expected, what to do`, and the command exits with
status 2; nothing is written (the output directory it opened is rolled back: see
[training.md](training.md#output-directories)). `--debug` (or `ANYBIT_DEBUG=1`) adds the traceback.

| what happened | what you get | exit |
|---|---|---|
| a usage mistake: an unknown option, a value its type refuses (`--epochs x`, `--lr inf`, `--seed -1`) | `anybit train: error: argument --lr: 'inf' is not a finite number (see anybit train --help)` | 2 |
| a bad value, a missing or corrupt file, a checkpoint or state that does not fit (a `ValueError` or `FileNotFoundError` of anybit's) | `anybit eval: error: ...` naming the flag or file | 2 |
| an operating-system error: a full disk, a read-only or unwritable directory | `anybit train: error: no space left on device writing runs/x/model.safetensors; free some space or give another --out` | 2 |
| out of memory | `anybit train: error: out of memory; use smaller settings ...` | 2 |
| training diverged (a NaN or infinite loss) | `anybit train: error: training diverged: ... lower the learning rate (--lr ...)` | 2 |
| Ctrl-C, SIGTERM or SIGHUP (also during start-up) | `anybit train: interrupted (SIGTERM)` plus where the unfinished run or the previous output is | 130 / 143 / 129 |
| anything else: a bug | `anybit train: internal error: TypeError: ... (re-run with --debug for the traceback, and please report it)` | 1 |

A warning is one line too: `anybit train: warning: ...` (a training that collapsed to one output, layers
left in float, sensitivities that are all zero).
"""


def error_types() -> list[type[BaseException]]:
    import anybit

    for info in pkgutil.walk_packages(anybit.__path__, "anybit."):
        if not info.name.endswith("__main__"):      # (that one runs the command line)
            importlib.import_module(info.name)
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("anybit"):
            continue
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("anybit") and not obj.__name__.startswith("_"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found, key=lambda k: (found[k].__module__, found[k].__qualname__))]


def _builtin_base(cls: type) -> str:
    for base in cls.__mro__:
        if base.__module__ == "builtins" and base in (FileNotFoundError, ValueError, KeyboardInterrupt, OSError):
            return base.__name__
    return next(b.__name__ for b in cls.__mro__ if b.__module__ == "builtins")


def types_table() -> str:
    from anybit.cli import exit_status

    rows = ["| error | module | a | exit | raised for |", "|---|---|---|---|---|"]
    for cls in error_types():
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        parents = [b.__name__ for b in cls.__bases__ if b.__module__.startswith("anybit")]
        kind = ", ".join(parents + [_builtin_base(cls)])
        rows.append(f"| `{cls.__name__}` | `{cls.__module__}` | {kind} | {exit_status(cls)} | {doc.replace('|', '/')} |")
    return "\n".join(rows)


def cases_table(rows: list[dict]) -> str:
    out = ["| case | mistake | exit | the line printed |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| `{r['case']}` | {r['mistake']} | {r['status']} | `{r['first'].replace('|', '/')}` |")
    return "\n".join(out)


def case_rows() -> list[dict]:
    import cli_cases
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="anybit-errors-") as tmp:
        base = cli_cases.build_work(Path(tmp) / "work")
        for case in cli_cases.CASES:
            if case.mount and not cli_cases.can_mount():
                continue
            r = cli_cases.run_in_process(case, base, Path(tmp))
            rows.append({"case": case.name, "mistake": case.mistake, "status": r["status"], "first": r["first"]})
    return rows


def section(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    return text[text.index(start) + len(start):text.index(end)].strip()


def documented_lines(text: str | None = None) -> dict[str, str]:
    """``{case: the line printed}`` from the cases table of docs/errors.md."""
    text = DOC.read_text() if text is None else text
    lines = {}
    for row in section(text, CASES).splitlines()[2:]:
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        lines[cells[0].strip("`")] = cells[-1].strip("`")
    return lines


def render(rows: list[dict]) -> str:
    return (f"{INTRO}\n## Error types\n\nEvery error anybit raises, generated from the code (`python "
            f"scripts/errors_doc.py`; the tests check it). The CLI prints the message of each on one line.\n\n"
            f"{TYPES[0]}\n{types_table()}\n{TYPES[1]}\n\n## What each bad input prints\n\nThe bad-input cases of "
            f"the tests (`tests/cli_cases.py`), each run through the command line in a copy of a small work "
            f"directory (a trained run `run/`, a float checkpoint `float/`, ...). Each exits 2 with this one line, "
            f"writes nothing and changes nothing; `scripts/cli_battery.py` checks the same through the real "
            f"command line ([BENCHMARKS.md](BENCHMARKS.md#bad-input-through-the-command-line)).\n\n"
            f"{CASES[0]}\n{cases_table(rows)}\n{CASES[1]}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the error-type table with docs/errors.md")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.check:
        ok = section(DOC.read_text(), TYPES) == types_table()
        print("docs/errors.md is up to date" if ok else "docs/errors.md is out of date: run scripts/errors_doc.py")
        return 0 if ok else 1
    DOC.write_text(render(case_rows()))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
