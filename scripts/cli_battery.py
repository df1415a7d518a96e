"""Run every bad-input case of the tests (tests/cli_cases.py) through the real command line, each in a
subprocess in a fresh copy of a work directory, and print a table: case, exit code, first stderr line,
lines printed, output left, data lost. Every row must exit 2 with one line, leave no output and lose
no data; the script exits 1 if one does not.

    python scripts/cli_battery.py                 # the table (Markdown with --markdown)
    python scripts/cli_battery.py --write-docs    # also replace the table in docs/BENCHMARKS.md

The full-disk and read-only cases mount a small tmpfs and need root; without it they are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

import cli_cases  # noqa: E402

BEGIN, END = "<!-- cli-battery:begin -->", "<!-- cli-battery:end -->"


def run_case(case: cli_cases.Case, base: Path, scratch: Path) -> dict:
    work = scratch / case.name
    shutil.copytree(base, work, symlinks=True)
    cleanup = cli_cases.prepare(case, work)
    try:
        before = cli_cases.snapshot(work)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        env.pop("ANYBIT_DEBUG", None)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "anybit", *case.argv], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        after = cli_cases.snapshot(work)
    finally:
        cleanup()
    left, lost = cli_cases.compare(before, after)
    err = done.stderr.splitlines()
    lines = len(err) + len(done.stdout.splitlines())
    row = {"case": case.name, "mistake": case.mistake, "exit": done.returncode,
           "first": cli_cases.normalise(err[0], work) if err else "", "lines": lines,
           "left": left, "lost": lost, "seconds": seconds}
    row["ok"] = done.returncode == 2 and lines == 1 and not left and not lost
    shutil.rmtree(work, ignore_errors=True)
    return row


def table(rows: list[dict], markdown: bool) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = ["| case | exit | first stderr line | lines | output left | data lost |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['case']} | {r['exit']} | {cell(r['first'])} | {r['lines']} | "
                   f"{', '.join(r['left']) or 'no'} | {', '.join(r['lost']) or 'no'} |")
    if markdown:
        return "\n".join(out)
    return "\n".join(f"{r['case']:<28} {r['exit']:>4} {r['lines']:>3} {'ok' if r['ok'] else 'FAIL':<4} "
                     f"{r['first'][:150]}" + (f"  left={r['left']} lost={r['lost']}" if r['left'] or r['lost'] else "")
                     for r in rows)


def write_docs(rows: list[dict], skipped: list[str]) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    ok = sum(r["ok"] for r in rows)
    body = (f"{BEGIN}\n`python scripts/cli_battery.py --write-docs`: {len(rows)} cases, each the real command line in a "
            f"subprocess in a fresh copy of the work directory; {ok} of {len(rows)} exit 2 with one line, leave no output "
            f"and lose no data" + (f"; skipped (no tmpfs): {', '.join(skipped)}" if skipped else "")
            + ".\n\n" + table(rows, markdown=True) + f"\n{END}")
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Bad input through the command line\n\n" + body + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--write-docs", action="store_true", help="replace the table in docs/BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", help="run only these cases")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    cases = [c for c in cli_cases.CASES if not args.only or c.name in args.only]
    skipped = [c.name for c in cases if c.mount and not cli_cases.can_mount()]
    cases = [c for c in cases if c.name not in skipped]
    with tempfile.TemporaryDirectory(prefix="anybit-battery-") as tmp:
        base = cli_cases.build_work(Path(tmp) / "work")
        rows = []
        for case in cases:
            rows.append(run_case(case, base, Path(tmp)))
            print(table(rows[-1:], markdown=False), file=sys.stderr, flush=True)
    print(table(rows, markdown=args.markdown))
    if skipped:
        print(f"skipped (need root for a tmpfs): {', '.join(skipped)}")
    if args.write_docs:
        write_docs(rows, skipped)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
