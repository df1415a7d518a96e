"""Write benchmarks/data/english-sentences.txt: English sentences found offline on any machine with
Python (the docstrings of the standard library) and Debian (the license texts in
/usr/share/common-licenses), one per line, deduplicated and shuffled with a fixed seed.

    python benchmarks/make_sentences.py

A sentence is kept when it has 6-40 words, starts with a capital letter, ends with . ! or ? and holds
no code-like characters (no brackets other than round ones, no = < > _ ` * / \\ #). The file is
committed, so the text benchmark does not depend on the Python version that runs it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import random
import re
import sys
import warnings
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "english-sentences.txt"
SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-]*[a-z][.!?]$")
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}


def sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in SPLIT.split(text) if 6 <= len(s.split()) <= 40 and SENTENCE.match(s.strip())]


def license_sentences() -> list[str]:
    found = []
    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            found += sentences(path.read_text(errors="ignore"))
    return found


def docstring_sentences() -> list[str]:
    found = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objects = [module] + [getattr(module, a, None) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in objects:
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and (obj is module or getattr(obj, "__module__", None) == name):
                    for paragraph in re.split(r"\n\s*\n", doc):
                        found += sentences(paragraph)
    return found


def main() -> int:
    unique = sorted(set(docstring_sentences()) | set(license_sentences()))
    random.Random(0).shuffle(unique)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(unique) + "\n", encoding="utf-8")
    print(f"wrote {len(unique)} sentences to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
