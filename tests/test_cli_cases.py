"""Every bad-input case (tests/cli_cases.py) through ``anybit.cli.main``: exit status 2, one line, no output
left, no data lost; the line is the one docs/errors.md documents, and its error-type table matches the code.
``scripts/cli_battery.py`` runs the same cases through the real command line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import cli_cases

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import errors_doc  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return cli_cases.build_work(tmp_path_factory.mktemp("cases") / "work")


@pytest.fixture(scope="module")
def documented():
    return errors_doc.documented_lines()


@pytest.mark.parametrize("case", cli_cases.CASES, ids=[c.name for c in cli_cases.CASES])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, work, tmp_path, documented):
    if case.mount and not cli_cases.can_mount():
        pytest.skip("needs root to mount a tmpfs (the injected-error tests in test_outdir.py cover it)")
    result = cli_cases.run_in_process(case, work, tmp_path)
    assert result["status"] == 2, result["stderr"]
    assert result["stdout"] == "" and result["stderr"].count("\n") == 1, result["stderr"] + result["stdout"]
    assert "Traceback" not in result["stderr"] and "internal error" not in result["stderr"]
    assert result["left"] == [] and result["lost"] == [], result
    assert documented.get(case.name) == result["first"], "docs/errors.md is out of date: run scripts/errors_doc.py"


def test_errors_doc_lists_every_error_type():
    assert errors_doc.section(errors_doc.DOC.read_text(), errors_doc.TYPES) == errors_doc.types_table()
    assert set(errors_doc.documented_lines()) == {c.name for c in cli_cases.CASES}
