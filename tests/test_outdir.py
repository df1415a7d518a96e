"""The output-directory guard (anybit/cli/outdir.py): nothing lost when an --overwrite fails or is
interrupted (SIGTERM, SIGKILL, a full disk), a lock that a killed process does not leave stuck, only
anybit's own directories replaced, atomic log rewrites and stray temporary files cleaned."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anybit.checkpoint
import anybit.train.state
from anybit.cli import main
from anybit.cli.outdir import MARKER, is_locked, previous_path, read_marker
from anybit.report import CSVLog

SRC = Path(__file__).resolve().parent.parent / "src"
TRAIN = ["train", "--dataset", "synthetic", "--data-option", "num_samples=64", "--data-option", "image_size=8",
         "--width", "0.25", "--bits", "2,32", "--batch-size", "32", "--quiet", "--device", "cpu"]

# A real `anybit train` that stops after its first epoch (state saved) and waits there to be killed.
DRIVER = """
import sys, time
from anybit.train import trainer as T
original = T.MultiBitTrainer._end_epoch
def end_epoch(self, record):
    original(self, record)
    if record["epoch"] == 1:
        print("READY", flush=True)
        time.sleep(300)
T.MultiBitTrainer._end_epoch = end_epoch
from anybit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def start_driver(tmp_path: Path, *argv: str) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready and proc.stdout.readline().strip() == "READY":
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the driver did not reach its first epoch: {proc.stderr.read()}")


@pytest.fixture()
def old_run(tmp_path, monkeypatch):
    """A complete run at tmp_path/run (1 epoch), with the checkpoint's digest."""
    monkeypatch.chdir(tmp_path)
    assert main([*TRAIN, "--epochs", "1", "--out", "run"]) == 0
    return tmp_path / "run", digest(tmp_path / "run" / "model.safetensors")


def test_sigterm_during_overwrite_keeps_the_old_run_and_the_new_one_resumes(old_run, tmp_path, capsys):
    run, old = old_run
    proc = start_driver(tmp_path, *TRAIN, "--epochs", "2", "--out", "run", "--overwrite")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.count("\n") == 1 and "interrupted (SIGTERM)" in err and ".run.anybit-previous" in err, err
    previous = previous_path(run)
    assert digest(previous / "model.safetensors") == old          # the old run survived, named in the message
    assert (run / "state" / "state.json").is_file() and read_marker(run)["state"] == "unfinished"
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "2", "--out", "run"]) == 2    # neither flag: refused, both named
    err = capsys.readouterr().err
    assert "--resume" in err and ".run.anybit-previous" in err
    assert main([*TRAIN, "--epochs", "2", "--out", "run", "--resume"]) == 0
    assert not previous.exists() and read_marker(run)["state"] == "complete"
    assert len(json.loads((run / "run.json").read_text())["epochs"]) == 2


def test_sigkill_leaves_no_stuck_lock_and_the_old_run(old_run, tmp_path, capsys):
    run, old = old_run
    proc = start_driver(tmp_path, *TRAIN, "--epochs", "2", "--out", "run", "--overwrite")
    try:
        assert is_locked(run)
        # a second run, a resume and an overwrite of the live directory are refused, and touch nothing
        for extra in (["--resume"], ["--overwrite"], []):
            capsys.readouterr()
            assert main([*TRAIN, "--epochs", "2", "--out", "run", *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"in use by another anybit train (pid {proc.pid})" in err, err
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert not is_locked(run)                                       # the kernel dropped the dead process's lock
    assert digest(previous_path(run) / "model.safetensors") == old
    assert read_marker(run)["state"] == "running"                   # what the killed process left
    assert main([*TRAIN, "--epochs", "2", "--out", "run", "--resume"]) == 0
    assert not previous_path(run).exists() and read_marker(run)["state"] == "complete"


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "anybit", *TRAIN, "--epochs", "1", "--out", "x"], cwd=tmp_path,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.4)                                                 # still importing torch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted (SIGINT)" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_during_overwrite_restores_the_old_run(old_run, tmp_path, monkeypatch, capsys):
    run, old = old_run
    capsys.readouterr()
    monkeypatch.setattr(anybit.train.state, "save_file", _no_space)  # the first state save fails
    assert main([*TRAIN, "--epochs", "2", "--out", "run", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device writing run/state/state-epoch1.safetensors" in err
    assert "run was restored to its previous contents" in err
    assert digest(run / "model.safetensors") == old and read_marker(run)["state"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]   # no staging, previous or trash left


def test_full_disk_at_the_last_save_keeps_both_runs(old_run, tmp_path, monkeypatch, capsys):
    run, old = old_run
    real = anybit.checkpoint.save_file

    def model_fails(tensors, path, *args, **kwargs):
        if Path(path).name.startswith(".model.safetensors"):
            _no_space()
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(anybit.checkpoint, "save_file", model_fails)
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "1", "--out", "run", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "continue it with --resume" in err and ".run.anybit-previous" in err
    assert digest(previous_path(run) / "model.safetensors") == old
    monkeypatch.setattr(anybit.checkpoint, "save_file", real)
    assert main([*TRAIN, "--epochs", "1", "--out", "run", "--resume"]) == 0
    assert not previous_path(run).exists()


def test_read_only_out_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if "ro" in Path(path).parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    assert main([*TRAIN, "--epochs", "1", "--out", "ro/new"]) == 2
    err = capsys.readouterr().err
    assert err == "anybit train: error: read-only file system creating ro; give a writable --out\n"
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_what_anybit_marked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text('{"command": "train"}')       # looks like a run, has no marker
    assert main([*TRAIN, "--epochs", "1", "--out", "other", "--overwrite"]) == 2
    assert "not an anybit output directory" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["run.json"]
    legacy = tmp_path / "legacy"                                   # a marker written by an older anybit
    legacy.mkdir()
    (legacy / MARKER).write_text("written by anybit; --overwrite may replace this directory\n")
    (legacy / "log.csv").write_text("old\n")
    assert main([*TRAIN, "--epochs", "1", "--out", "legacy", "--overwrite"]) == 0
    assert read_marker(legacy)["state"] == "complete" and (legacy / "model.safetensors").is_file()


def test_killed_between_the_renames_is_recovered(old_run, tmp_path, capsys):
    run, old = old_run
    run.rename(previous_path(run))                                 # as a kill after the first rename leaves it
    (tmp_path / ".run.anybit-new-999999").mkdir()
    capsys.readouterr()
    assert main([*TRAIN, "--epochs", "1", "--out", "run"]) == 2    # the old run is back, so: not empty
    assert "already exists" in capsys.readouterr().err
    assert digest(run / "model.safetensors") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_resume_cleans_stray_tmp_files_and_rewrites_the_log_atomically(old_run, tmp_path, monkeypatch):
    run, _ = old_run
    for stray in (run / ".model.json.k3j2.tmp", run / "state" / ".state.json.x9.tmp"):
        stray.write_text("half a write")
    assert main([*TRAIN, "--epochs", "1", "--out", "run", "--resume"]) == 0
    assert not list(run.rglob("*.tmp"))
    log = CSVLog(run / "log.csv", ["epoch", "bits"])
    before = (run / "log.csv").read_text()

    class FullDisk(dict):                                          # fails half-way through the rewrite
        def get(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        log.rewrite([{"epoch": 1, "bits": 2}, FullDisk()])
    assert (run / "log.csv").read_text() == before and not list(run.glob(".log.csv*"))
