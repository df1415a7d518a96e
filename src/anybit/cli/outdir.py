"""Output directories: the one guard every command writes through.

* A directory is locked (``flock`` on the directory itself) while a command writes to it: a second
  run, or a ``--resume`` of a live one, is refused; a killed process leaves no stale lock (the kernel
  drops it).
* A new directory appears complete with its marker (:data:`MARKER`): it is built under a hidden
  staging name and renamed into place. The marker says which command wrote it and whether that
  command finished; ``--overwrite`` replaces only directories that hold it.
* ``--overwrite`` moves the old contents aside to ``.NAME.anybit-previous`` and deletes them only
  when the new run completes. A failed or interrupted run puts them back, or, when it leaves a
  training state that ``--resume`` can continue, keeps both and says where the old one is. After a
  SIGKILL the next command on the same ``--out`` finds the pieces and recovers them.
* SIGINT/SIGTERM that arrive while directories are being renamed are held back until the renames
  are done (:func:`critical`).

Only the standard library is imported here: the CLI loads it before torch.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None

from .errors import CLIError

MARKER = ".anybit-output"
PREVIOUS_SUFFIX = ".anybit-previous"
STAGING_SUFFIX = ".anybit-new-"
TRASH_SUFFIX = ".anybit-trash-"
_LEGACY_MARKER_TEXT = "written by anybit"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------------- signals
_critical_depth = 0
_pending: list[int] = []
_raised: list[int] = []     # the signals raised since the handlers were installed


def signal_raised() -> int | None:
    """The first signal the handler raised in this command (``None``: none). An interrupted import can
    end in another exception (a half-initialised module), which is still the interruption's doing."""
    return _raised[0] if _raised else None


def _raise_for(signum: int) -> None:
    _raised.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(signum)


def signal_handler(signum, _frame) -> None:
    """The CLI's handler for SIGINT, SIGTERM and SIGHUP: raise, unless inside :func:`critical`."""
    if _critical_depth:
        _pending.append(signum)
        return
    _raise_for(signum)


@contextmanager
def critical():
    """Hold back SIGINT/SIGTERM (when :func:`signal_handler` is installed) until the block is done."""
    global _critical_depth
    _critical_depth += 1
    try:
        yield
    finally:
        _critical_depth -= 1
        if not _critical_depth and _pending:
            signum = _pending[0]
            _pending.clear()
            _raise_for(signum)


# ---------------------------------------------------------------------- markers and locks
def read_marker(directory: Path) -> dict | None:
    """The marker of an anybit output directory (``None``: not one). Markers of older anybit versions
    (a line of text) read as a finished output of an unknown command."""
    path = Path(directory) / MARKER
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {"command": None, "state": "complete"} if text.startswith(_LEGACY_MARKER_TEXT) else None
    return data if isinstance(data, dict) and data.get("written_by") == "anybit" else None


def _write_marker(directory: Path, command: str, state: str) -> None:
    data = {"written_by": "anybit", "command": command, "state": state, "pid": os.getpid(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "note": "--overwrite may replace this directory"}
    tmp = directory / f".{MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, directory / MARKER)


def _lock(directory: Path) -> int | None:
    """A file descriptor holding an exclusive lock on ``directory``, or ``None`` if another process holds it."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def is_locked(directory: str | os.PathLike) -> bool:
    """Whether a live process holds ``directory`` (used by tests and the battery)."""
    fd = _lock(Path(directory))
    _unlock(fd)
    return fd is None


def _in_use(out: Path) -> CLIError:
    marker = read_marker(out) or {}
    who = f"anybit {marker['command']}" if marker.get("command") else "anybit command"
    pid = f" (pid {marker['pid']})" if marker.get("pid") else ""
    return CLIError(f"--out {out} is in use by another {who}{pid}; wait for it to finish or give another --out")


# ---------------------------------------------------------------------- the guard
@dataclass
class _OpenOutput:
    path: Path
    command: str
    lock: int | None
    made_here: bool                      # the directory did not exist (or was replaced) before this command
    previous: Path | None                # the previous contents, kept until this command completes
    previous_lock: int | None = None
    created_parents: list[Path] = field(default_factory=list)
    was_empty: bool = False
    shown: Path | None = None            # the path as the user gave it (for messages)


_OPEN: list[_OpenOutput] = []


def open_out_dirs() -> list[Path]:
    """Directories the running command has opened (for messages)."""
    return [o.path for o in _OPEN]


def previous_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{PREVIOUS_SUFFIX}")


def check_out_path(path: str | os.PathLike, inputs=(), what: str | None = None) -> Path:
    """``--out`` as a Path: refused if it is (or lies under) a file, or is or contains one of ``inputs``
    (the command's checkpoint, its data directory)."""
    if str(path).strip() == "":
        raise CLIError("--out is empty: give a directory path")
    out = Path(path)
    what = what or f"--out {out}"
    resolved = out.resolve()
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = Path(item).resolve()
        if source == resolved or resolved in source.parents:
            raise CLIError(f"{what} holds this command's input {item}; writing there would replace it. "
                           f"Give another --out")
    for ancestor in (out, *out.parents):
        if ancestor.is_dir():
            break
        if ancestor.exists() or ancestor.is_symlink():
            if ancestor == out:
                raise CLIError(f"{what} exists and is not a directory; give a directory path (it is created "
                               f"if missing)")
            raise CLIError(f"{what} lies under {ancestor}, which is a file, not a directory; give another --out")
    return out


def prepare_out_dir(path: str | os.PathLike, overwrite: bool, resume: bool = False, can_resume: bool = False,
                    inputs: tuple = (), command: str = "run", own_only: bool = False,
                    what: str | None = None) -> Path:
    """Open the output directory for this command (see the module docstring); returns it.

    A non-empty directory is refused unless ``resume`` (continue it in place) or ``overwrite`` (replace it,
    only if anybit wrote it; ``own_only``: only if ``command`` wrote it). :func:`close_out_dirs` ends it.
    """
    given = check_out_path(path, inputs, what)
    if overwrite and resume:
        raise CLIError("--overwrite and --resume contradict each other: choose one")
    out = given.resolve()       # renames and sibling names work on the real directory
    with critical():
        try:
            created = _make_parents(out.parent)
        except OSError as e:
            if e.errno is not None:
                e.filename, e.anybit_action = str(given.parent), "creating"
            raise
        try:
            _open(out, overwrite, resume, can_resume, command, own_only, created, given)
        except BaseException as e:
            _remove_empty(created)
            if isinstance(e, OSError) and e.errno is not None:   # name --out, not a staging directory
                e.filename, e.anybit_action = str(given), "creating"
            raise
        _OPEN[-1].shown = given
    return given


def _open(out: Path, overwrite: bool, resume: bool, can_resume: bool, command: str, own_only: bool,
          created: list[Path], given: Path) -> None:
    _recover(out)
    previous = previous_path(out)
    if not out.exists():
        lock = _create(out, command)
        _OPEN.append(_OpenOutput(out, command, lock, True, None, created_parents=created))
        return
    lock = _lock(out)
    if lock is None:
        raise _in_use(given)
    try:
        if not any(out.iterdir()):
            _write_marker(out, command, "running")
            _OPEN.append(_OpenOutput(out, command, lock, False, None, created_parents=created, was_empty=True))
            return
        marker = read_marker(out)
        if resume:
            clean_stray_tmp(out)
            if marker is not None:
                _write_marker(out, command, "running")
            _OPEN.append(_OpenOutput(out, command, lock, False, previous if previous.is_dir() else None,
                                     created_parents=created))
            return
        if not overwrite:
            raise CLIError(_not_empty_message(given, marker, can_resume, previous))
        _check_replaceable(given, marker, command if own_only else None)
        old_lock = None
        staging, new_lock = _staging(out, command)
        try:
            if previous.is_dir() and marker is not None and marker.get("state") != "complete":
                _trash(out)              # an unfinished run replacing nothing new: the previous output stays
            else:
                if previous.is_dir():
                    _trash(previous)     # outdated: what it held was replaced by a complete run since
                out.rename(previous)
            old_lock = lock
            staging.rename(out)
        except BaseException:
            _unlock(new_lock)
            shutil.rmtree(staging, ignore_errors=True)
            if previous.is_dir() and not out.exists():
                previous.rename(out)
            raise
        _OPEN.append(_OpenOutput(out, command, new_lock, True, previous if previous.is_dir() else None,
                                 old_lock, created))
    except BaseException:
        if not any(o.lock == lock or o.previous_lock == lock for o in _OPEN):
            _unlock(lock)
        raise


def _create(out: Path, command: str) -> int | None:
    staging, lock = _staging(out, command)
    try:
        staging.rename(out)
    except OSError:
        _unlock(lock)
        shutil.rmtree(staging, ignore_errors=True)
        if out.exists():
            raise _in_use(out) from None
        raise
    return lock


def _staging(out: Path, command: str) -> tuple[Path, int | None]:
    staging = out.with_name(f".{out.name}{STAGING_SUFFIX}{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    lock = _lock(staging)
    _write_marker(staging, command, "running")
    return staging, lock


def _trash(directory: Path) -> None:
    trash = directory.with_name(f".{directory.name}{TRASH_SUFFIX}{os.getpid()}")
    directory.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _recover(out: Path) -> None:
    """Clean up after a process killed while it held ``out``: stale staging and trash directories go,
    and the previous contents come back if the directory itself is missing."""
    pattern = glob.escape(f".{out.name}")
    for stale in [*out.parent.glob(f"{pattern}{STAGING_SUFFIX}*"), *out.parent.glob(f"{pattern}{TRASH_SUFFIX}*")]:
        if not stale.is_dir():
            continue
        fd = _lock(stale)
        if fd is not None:
            shutil.rmtree(stale, ignore_errors=True)
            _unlock(fd)
    previous = previous_path(out)
    if previous.is_dir() and not out.exists():
        fd = _lock(previous)
        if fd is not None:
            previous.rename(out)
            _unlock(fd)


def clean_stray_tmp(out: Path) -> list[Path]:
    """Remove ``.NAME.*.tmp`` files left by writes that a kill interrupted (never a live writer's: the
    caller holds the directory's lock)."""
    removed = []
    for directory in (out, out / "state", out / "bitmaps"):
        if directory.is_dir():
            for tmp in directory.glob(".*.tmp"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
    return removed


def _not_empty_message(out: Path, marker: dict | None, can_resume: bool, previous: Path) -> str:
    if marker is not None and marker.get("state") in ("running", "unfinished"):
        resumable = can_resume and (out / "state" / "state.json").is_file()
        text = (f"output directory {out} holds an unfinished anybit {marker.get('command') or 'run'} (interrupted "
                f"or killed); pass " + ("--resume to continue it or " if resumable else "")
                + "--overwrite to replace it")
    else:
        text = (f"output directory {out} already exists and is not empty; pass --overwrite to replace it"
                + (" or --resume to continue it" if can_resume else ""))
    if previous.is_dir():
        text += f" (the output it replaced is kept in {_sibling(out, previous)})"
    return text


def _sibling(shown: Path, real: Path) -> Path:
    """``real`` (a sibling of the resolved directory) as a sibling of the path the user gave."""
    return shown.with_name(real.name) if shown.name else real


def _check_replaceable(out: Path, marker: dict | None, own_command: str | None) -> None:
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise CLIError(f"--out {out} is the current directory, one of its parents or the home directory; "
                       f"--overwrite would delete it. Give a directory of its own for --out")
    legacy = _legacy_run_command(out) if marker is None else None
    if legacy is not None and own_command is not None:
        if legacy == own_command:
            return
        marker = {"command": legacy}
    if marker is None:
        entries = sorted(p.name for p in out.iterdir())
        raise CLIError(f"--out {out} is not empty and is not an anybit output directory (no {MARKER} marker; it "
                       f"holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); --overwrite replaces "
                       f"only directories anybit wrote. Choose another --out, or empty it yourself")
    if own_command is not None and marker.get("command") not in (None, own_command):
        raise CLIError(f"--out {out} holds the output of another anybit command (anybit {marker.get('command')}); "
                       f"{own_command} would replace it. Give another --out")


def _legacy_run_command(out: Path) -> str | None:
    """The command of a run.json written by an older anybit that wrote no marker (eval)."""
    try:
        data = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("environment"), dict) and "anybit" in data["environment"]:
        return data.get("command")
    return None


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing            # deepest first


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:
        try:
            d.rmdir()
        except OSError:
            break


def close_out_dirs(succeeded: bool, resumable: bool = True) -> list[str]:
    """End every directory the command opened; returns notes for the user (what was kept where).

    Success: the marker says complete and the previous contents are deleted. Failure: a directory
    this command created is removed and the previous contents come back, unless it holds a
    training state ``--resume`` can continue (then both are kept and named); a directory that was
    empty before is emptied again. ``resumable=False`` (the run stopped for a reason a resume would meet
    again, such as divergence): the state is kept, but not offered for ``--resume``."""
    notes: list[str] = []
    with critical():
        while _OPEN:
            o = _OPEN.pop()
            try:
                if succeeded:
                    _write_marker(o.path, o.command, "complete")
                    if o.previous is not None:
                        shutil.rmtree(o.previous, ignore_errors=True)
                else:
                    notes += _roll_back(o, resumable)
            except OSError as e:
                notes.append(f"could not finish {o.path} ({e.strerror or e})")
            finally:
                _unlock(o.lock)
                _unlock(o.previous_lock)
    return notes


def _roll_back(o: _OpenOutput, resumable: bool = True) -> list[str]:
    shown = o.shown or o.path
    if (o.path / "state" / "state.json").is_file():
        _write_marker(o.path, o.command, "unfinished")
        note = (f"{shown} holds the unfinished run: continue it with --resume" if resumable
                else f"{shown} keeps the unfinished run's last good state (--overwrite replaces it)")
        if o.previous is not None and o.previous.is_dir():
            note += f" (the output it replaces is kept in {_sibling(shown, o.previous)} until a run completes)"
        return [note]
    if o.made_here:
        shutil.rmtree(o.path, ignore_errors=True)
        if o.previous is not None and o.previous.is_dir():
            o.previous.rename(o.path)
            return [f"{shown} was restored to its previous contents"]
        _remove_empty(o.created_parents)
        return []
    if o.was_empty:
        for entry in o.path.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return []


def install_signal_handlers() -> dict:
    """Install :func:`signal_handler` for SIGINT, SIGTERM and SIGHUP (main thread only); returns the
    previous handlers for :func:`restore_signal_handlers`."""
    import threading

    previous = {}
    _raised.clear()
    if threading.current_thread() is not threading.main_thread():
        return previous
    for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, signal_handler)
        except (OSError, ValueError):  # pragma: no cover
            pass
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError, TypeError):  # pragma: no cover
            pass


__all__ = ["MARKER", "Interrupted", "check_out_path", "clean_stray_tmp", "close_out_dirs", "critical",
           "install_signal_handlers", "is_locked", "open_out_dirs", "prepare_out_dir", "previous_path",
           "read_marker", "restore_signal_handlers", "signal_handler"]

