"""Every bad-input case of the command line, in one list shared by the tests (``test_cli_cases.py``, in-process)
and the battery (``scripts/cli_battery.py``, the real CLI in subprocesses).

Each case runs in a fresh copy of a work directory built once by :func:`build_work` (a trained run, a float
checkpoint, small Fashion-MNIST files, an image folder, another tool's directory...), with the work directory
as the current directory, so messages hold relative paths. What a case must show: exit status 2, one line on
stderr and nothing on stdout, no new file left behind and no existing file changed or removed
(:func:`snapshot` before and after).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SYN = ["--dataset", "synthetic", "--data-option", "num_samples=64", "--data-option", "image_size=8"]
TRAIN = ["train", "--width", "0.25", "--bits", "2,32", "--epochs", "1", "--batch-size", "32", "--quiet",
         "--device", "cpu"]


@dataclass
class Case:
    name: str
    mistake: str                         # what the user did, in words (docs/errors.md)
    argv: list[str]
    setup: Callable[[Path], Callable[[], None] | None] | None = None   # may return a clean-up
    mount: str | None = None             # "full" / "read-only": needs a small tmpfs at work/mnt (root)
    tags: tuple[str, ...] = field(default_factory=tuple)


# ---------------------------------------------------------------------- set-ups
def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _sidecar(change):
    def setup(work: Path):
        _edit_json(work / "run" / "model.json", change)
    return setup


def _state(change):
    def setup(work: Path):
        _edit_json(work / "run" / "state" / "state.json", change)
    return setup


def _hold_lock(work: Path):
    """Another process holds run/ (what a live training does): here the caller holds the lock."""
    fd = os.open(work / "run", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return lambda: os.close(fd)


def _data_inside_out(work: Path):
    shutil.copytree(work / "fmnist", work / "run" / "data")


def _bit_map_elsewhere(work: Path):
    (work / "bitmap.json").write_text(json.dumps({"fc9": {"w": 4, "a": 8}}))


def _truncated_export(work: Path):
    """A packed export of run/ whose tensors file lost its second half (a copy cut short)."""
    from anybit.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(work / "run"), "--bits", "2", "--out", str(work / "packed")]) == 0
    tensors = work / "packed" / "model.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _set_in(outer, key, value):
    return lambda d: d[outer].__setitem__(key, value)


CASES: list[Case] = [
    # --- argparse: values refused by their types, one line with a pointer to --help
    Case("epochs-not-int", "a non-integer count", [*TRAIN, *SYN, "--epochs", "x", "--out", "new"]),
    Case("epochs-non-ascii", "non-ASCII digits", [*TRAIN, *SYN, "--epochs", "\u0664", "--out", "new"]),
    Case("lr-inf", "an infinite learning rate", [*TRAIN, *SYN, "--lr", "inf", "--out", "new"]),
    Case("lr-nan", "a NaN learning rate", [*TRAIN, *SYN, "--lr", "nan", "--out", "new"]),
    Case("weight-decay-inf", "an infinite weight decay", [*TRAIN, *SYN, "--weight-decay", "inf", "--out", "new"]),
    Case("width-inf", "an infinite width", [*TRAIN, *SYN, "--width", "inf", "--out", "new"]),
    Case("width-huge", "a width that would not fit in memory", [*TRAIN, *SYN, "--width", "1e12", "--out", "new"]),
    Case("seed-huge", "a seed beyond 2^32", [*TRAIN, *SYN, "--seed", "99999999999999999999", "--out", "new"]),
    Case("batch-size-huge", "a batch size beyond int64",
         [*TRAIN, *SYN, "--batch-size", "99999999999999999999", "--out", "new"]),
    Case("unknown-option", "an option that does not exist", [*TRAIN, *SYN, "--epoks", "3", "--out", "new"]),
    # --- bit lists: strict, bounded before they are expanded
    Case("bits-empty-item", "an empty item in --bits", [*TRAIN, *SYN, "--bits", "1,,2", "--out", "new"]),
    Case("bits-underscore", "1_6 in --bits", [*TRAIN, *SYN, "--bits", "1_6", "--out", "new"]),
    Case("bits-non-ascii", "non-ASCII digits in --bits", [*TRAIN, *SYN, "--bits", "\u0664", "--out", "new"]),
    Case("bits-huge-range", "a huge --bits range", [*TRAIN, *SYN, "--bits", "1-1000000000", "--out", "new"]),
    Case("keep-first-last-bad", "a malformed --keep-first-last", [*TRAIN, *SYN, "--keep-first-last", "1_6",
                                                                  "--out", "new"]),
    Case("method-unknown", "an unknown method", [*TRAIN, *SYN, "--method", "lsq", "--out", "new"]),
    # --- devices
    Case("device-meta", "--device meta", [*TRAIN, *SYN, "--device", "meta", "--out", "new"]),
    Case("device-mps", "--device mps on a machine without it", [*TRAIN, *SYN, "--device", "mps", "--out", "new"]),
    # --- dataset options: names, types and ranges checked before anything is built
    Case("data-option-channels-0", "channels=0", [*TRAIN, *SYN, "--data-option", "channels=0", "--out", "new"]),
    Case("data-option-huge-image", "image_size=1e9", [*TRAIN, *SYN, "--data-option", "image_size=1e9",
                                                      "--out", "new"]),
    Case("data-option-fraction", "num_samples=1.5", [*TRAIN, *SYN, "--data-option", "num_samples=1.5",
                                                     "--out", "new"]),
    Case("data-option-nan", "seed=nan", [*TRAIN, *SYN, "--data-option", "seed=nan", "--out", "new"]),
    Case("data-option-huge", "num_samples beyond int64",
         [*TRAIN, *SYN, "--data-option", "num_samples=99999999999999999999", "--out", "new"]),
    Case("data-option-unknown", "an option the dataset does not take",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-option", "num_samples=5", "--out", "new"]),
    # --- data directories: an explicit --data-dir is used or refused, never replaced by the system copy
    Case("data-dir-missing", "a --data-dir that does not exist",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "nowhere", "--out", "new"]),
    Case("data-dir-empty", "an empty --data-dir",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "emptydir", "--out", "new"]),
    Case("data-dir-one-split", "a --data-dir holding only the train split",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "onesplit", "--out", "new"]),
    Case("data-dir-synthetic", "--data-dir with synthetic data, which reads no files",
         [*TRAIN, *SYN, "--data-dir", "fmnist", "--out", "new"]),
    Case("idx-gzip-bomb", "an IDX file whose header claims gigabytes",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "bomb", "--out", "new"]),
    Case("imagefolder-corrupt-image", "a corrupt image in an image folder",
         [*TRAIN, "--dataset", "imagefolder", "--data-dir", "images", "--data-option", "image_size=8",
          "--out", "new"]),
    # --- output directories
    Case("out-under-file", "--out under a file", [*TRAIN, *SYN, "--out", "afile/sub"]),
    Case("out-is-file", "--out that is a file", [*TRAIN, *SYN, "--out", "afile"]),
    Case("out-not-empty", "an existing run without --overwrite or --resume", [*TRAIN, *SYN, "--out", "run"]),
    Case("overwrite-foreign", "--overwrite on another tool's directory that holds a run.json",
         [*TRAIN, *SYN, "--out", "other", "--overwrite"]),
    Case("overwrite-holds-data", "--overwrite on an --out that holds the --data-dir",
         [*TRAIN, "--dataset", "fashion-mnist", "--data-dir", "run/data", "--out", "run", "--overwrite"],
         setup=_data_inside_out),
    Case("resume-live-run", "--resume of a run another process is writing",
         [*TRAIN, *SYN, "--out", "run", "--resume"], setup=_hold_lock),
    Case("overwrite-live-run", "--overwrite of a run another process is writing",
         [*TRAIN, *SYN, "--out", "run", "--overwrite"], setup=_hold_lock),
    Case("out-full-disk", "a disk that fills up during --overwrite (tmpfs)",
         [*TRAIN, *SYN, "--out", "mnt/run", "--overwrite"], mount="full"),
    Case("out-read-only", "a read-only --out (tmpfs mounted read-only)", [*TRAIN, *SYN, "--out", "mnt/new"],
         mount="read-only"),
    # --- hostile training states
    Case("state-epoch-negative", "a state whose epoch is -5", [*TRAIN, *SYN, "--out", "run", "--resume"],
         setup=_state(_set("epoch", -5))),
    Case("state-epoch-99", "a state whose epoch is 99", [*TRAIN, *SYN, "--out", "run", "--resume"],
         setup=_state(_set("epoch", 99))),
    Case("state-missing", "a state without its 'state'", [*TRAIN, *SYN, "--out", "run", "--resume"],
         setup=_state(lambda d: d.pop("state"))),
    Case("state-tensors-path", "a state that points outside its directory",
         [*TRAIN, *SYN, "--out", "run", "--resume"], setup=_state(_set("tensors", "../../etc/passwd"))),
    # --- eval
    Case("eval-out-is-file", "CHECKPOINT/eval is a file", ["eval", "run", "--bits", "2", "--quiet"],
         setup=lambda work: (work / "run" / "eval").write_text("mine\n") and None),
    Case("eval-out-other-command", "eval --out onto a directory holding another checkpoint", ["eval", "run", "--bits", "2", "--out",
                                                                       "float", "--quiet"]),
    Case("eval-missing-checkpoint", "a checkpoint that does not exist", ["eval", "nothing", "--quiet"]),
    Case("eval-batch-size-0", "--batch-size 0", ["eval", "run", "--batch-size", "0", "--quiet"]),
    Case("eval-bits-huge-range", "a huge --bits range", ["eval", "run", "--bits", "1-1000000000", "--quiet"]),
    Case("sidecar-width", "a sidecar whose width is 1e30", ["eval", "run", "--bits", "2", "--quiet"],
         setup=_sidecar(lambda d: d["model"]["arch_kwargs"].__setitem__("width", 1e30))),
    Case("sidecar-classes", "a sidecar with -3 classes", ["eval", "run", "--bits", "2", "--quiet"],
         setup=_sidecar(lambda d: d["model"]["arch_kwargs"].__setitem__("num_classes", -3))),
    Case("sidecar-precision", "a sidecar precision of 99 bits", ["eval", "run", "--bits", "2", "--quiet"],
         setup=_sidecar(lambda d: d["precision"].__setitem__(next(iter(d["precision"])), [99, 99]))),
    Case("sidecar-bn-name", "a sidecar naming a BatchNorm the model lacks", ["eval", "run", "--bits", "2",
                                                                             "--quiet"],
         setup=_sidecar(_set("switchable_bn", {"nope": "4"}))),
    Case("sidecar-version", "a sidecar whose format_version is a string", ["eval", "run", "--bits", "2",
                                                                           "--quiet"],
         setup=_sidecar(_set("format_version", "x"))),
    Case("sidecar-spec", "a sidecar whose quantization spec is invalid", ["eval", "run", "--bits", "2",
                                                                          "--quiet"],
         setup=_sidecar(lambda d: d["model"]["quant_spec"].__setitem__("keep_first_last", 1000))),
    Case("sidecar-data-option", "a sidecar whose dataset options are invalid", ["eval", "run", "--bits", "2",
                                                                                "--quiet"],
         setup=_sidecar(lambda d: d["metadata"]["data"]["options"].__setitem__("num_samples", "x"))),
    # --- mixed
    Case("mixed-sweep-inf", "--sweep with inf", ["mixed", "run", "--sweep", "0.1:inf:0.1", "--out", "new"]),
    Case("mixed-sweep-tiny-step", "--sweep with a 1e-9 step", ["mixed", "run", "--sweep", "0.1:0.9:1e-9",
                                                               "--out", "new"]),
    Case("mixed-sweep-nan", "--sweep with nan", ["mixed", "run", "--sweep", "0.1:nan:0.1", "--out", "new"]),
    Case("mixed-max-loss-nan", "--max-loss nan", ["mixed", "run", "--objective", "cost", "--max-loss", "nan",
                                                  "--out", "new"]),
    Case("mixed-budget-nan", "--budget nan", ["mixed", "run", "--budget", "nan", "--out", "new"]),
    Case("mixed-options-empty", "an empty --options", ["mixed", "run", "--budget", "0.5", "--options", "",
                                                       "--out", "new"]),
    Case("mixed-batch-size-0", "--batch-size 0", ["mixed", "run", "--budget", "0.5", "--batch-size", "0",
                                                  "--out", "new"]),
    Case("mixed-a-bits-bad", "--a-bits 1_6", ["mixed", "run", "--budget", "0.5", "--a-bits", "1_6", "--out", "new"]),
    # --- export
    Case("export-packed-12-bits", "--bits 12 with --format packed", ["export", "run", "--bits", "12",
                                                                     "--format", "packed", "--out", "new"]),
    Case("export-bit-map-other-model", "a bit map naming a layer the model does not have",
         ["export", "run", "--bit-map", "bitmap.json", "--out", "new"], setup=_bit_map_elsewhere),
    Case("eval-truncated-export", "anybit eval of a packed export whose tensors file is truncated",
         ["eval", "packed", "--quiet"], setup=_truncated_export),
    # --- ptq
    Case("ptq-bit-options-empty", "an empty --bit-options", ["ptq", "float", "--pipeline", "light", "--budget",
                                                             "0.5", "--bit-options", "", "--out", "new"]),
    Case("ptq-budget-nan", "--budget nan", ["ptq", "float", "--pipeline", "light", "--budget", "nan",
                                            "--out", "new"]),
    Case("ptq-w-bits-99", "--w-bits 99", ["ptq", "float", "--w-bits", "99", "--out", "new"]),
    Case("ptq-keep-first-last-bad", "--keep-first-last x", ["ptq", "float", "--keep-first-last", "x",
                                                            "--out", "new"]),
]


# ---------------------------------------------------------------------- the work directory
def _write_idx(path: Path, array: np.ndarray) -> None:
    from anybit.data.idx import write_idx

    write_idx(path, array)


def build_work(root: Path) -> Path:
    """The files every case starts from (built once; each case gets a copy)."""
    from anybit.cli import main

    root.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*TRAIN, *SYN, "--out", "run"]) == 0, "the work directory's training run failed"
    finally:
        os.chdir(cwd)
    import torch

    import anybit
    from anybit.models import create

    torch.manual_seed(0)
    anybit.save(create("resnet20", width=0.25).eval(), root / "float" / "model",
                data={"dataset": "synthetic", "options": {"num_samples": 64, "image_size": 8}})
    rng = np.random.default_rng(0)
    for folder, splits in (("fmnist", ("train", "t10k")), ("onesplit", ("train",))):
        (root / folder).mkdir()
        for prefix in splits:
            n = 64 if prefix == "train" else 32
            _write_idx(root / folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), np.uint8))
            _write_idx(root / folder / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))
    (root / "emptydir").mkdir()
    (root / "bomb").mkdir()
    header = struct.pack(">IIII", 0x803, 3_000_000, 28, 28)          # 2.35 GB of images, it claims
    (root / "bomb" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + bytes(4 << 20)))
    shutil.copy(root / "fmnist" / "train-labels-idx1-ubyte.gz", root / "bomb")
    _image_folder(root / "images", rng)
    (root / "other").mkdir()
    (root / "other" / "run.json").write_text('{"tool": "someone else"}\n')
    (root / "other" / "data.txt").write_text("precious\n")
    (root / "afile").write_text("a file\n")
    return root


def _image_folder(root: Path, rng) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    (root / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


# ---------------------------------------------------------------------- mounts, snapshots, checks
def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


def prepare(case: Case, work: Path) -> Callable[[], None]:
    """Set the case up in ``work`` (a fresh copy); returns the clean-up to call afterwards."""
    cleanups: list[Callable[[], None]] = []
    if case.mount:
        mnt = work / "mnt"
        mnt.mkdir()
        if case.mount == "full":
            size = sum(p.stat().st_size for p in (work / "run").rglob("*") if p.is_file())
            _mount(mnt, f"size={size + 256 * 1024}")
            shutil.copytree(work / "run", mnt / "run")
            filler = mnt / "filler"                          # leave less room than a new run needs
            free = shutil.disk_usage(mnt).free
            filler.write_bytes(bytes(max(0, free - 60_000)))
        else:
            _mount(mnt, "size=64k,ro")
        cleanups.append(lambda: subprocess.run(["umount", "-l", str(mnt)], check=False))
    if case.setup is not None:
        done = case.setup(work)
        if callable(done):
            cleanups.append(done)
    return lambda: [c() for c in reversed(cleanups)]


def _mount(mnt: Path, options: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True, capture_output=True)


def snapshot(work: Path) -> dict[str, str]:
    """Every file and directory under ``work`` with a hash of its contents."""
    out = {}
    for p in sorted(work.rglob("*")):
        rel = str(p.relative_to(work))
        if p.is_symlink() or not p.exists():
            out[rel] = "link"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def compare(before: dict[str, str], after: dict[str, str]) -> tuple[list[str], list[str]]:
    """(new paths: output left, changed or missing paths: data lost)."""
    left = sorted(p for p in after if p not in before)
    lost = sorted(p for p, h in before.items() if after.get(p) != h)
    return left, lost


def normalise(line: str, work: Path) -> str:
    """A message with the work directory and process ids replaced, so runs compare."""
    line = line.replace(str(work.resolve()) + "/", "").replace(str(work) + "/", "")
    return re.sub(r"pid \d+", "pid N", line)


def run_in_process(case: Case, base: Path, scratch: Path) -> dict:
    """Run ``case`` through :func:`anybit.cli.main` in this process (a fresh copy of ``base`` as the current
    directory); returns exit status, stdout and stderr, the first stderr line normalised, output left and
    data lost."""
    from anybit.cli import main

    work = scratch / case.name
    shutil.copytree(base, work, symlinks=True)
    cleanup = prepare(case, work)
    cwd = Path.cwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        before = snapshot(work)
        os.chdir(work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = main(list(case.argv))
        finally:
            os.chdir(cwd)
        after = snapshot(work)
    finally:
        cleanup()
    left, lost = compare(before, after)
    lines = err.getvalue().splitlines()
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue(), "left": left, "lost": lost,
            "first": normalise(lines[0], work) if lines else ""}
