"""Trusting a task directory across runs: a lock, a completion marker, safe paths, checks.

    check_task_name("tiny")                   # UserError for "..", "a/b", "" ...
    inside(run_dir, "merged_lora")            # resolved, refused if it leaves run_dir
    check_writable(output_dir)                # before any heavy work (EnvironmentFailure)
    with TaskLock(run_dir):                   # LOCK: {"pid", "host"}, O_CREAT|O_EXCL
        clean_partial_exports(run_dir)        # .merged_lora.tmp-* of a killed export
        ...train, export...
        mark_complete(run_dir, {...})         # COMPLETE.json, written last (fsynced)
    is_complete(run_dir)                      # "finished" means exactly this

A second run on a held directory refuses at once naming the holder; a lock whose pid is dead
on this host is stale and taken over. The lock is released on exit, exceptions included.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path
from types import TracebackType
from typing import Any

from hfjax.atomic import write_json_atomic
from hfjax.errors import EnvironmentFailure, UserError

__all__ = ["COMPLETE_FILE", "LOCK_FILE", "OutputPathError", "TaskLock", "check_task_name",
           "check_writable", "clean_partial_exports", "clear_complete", "inside", "is_complete",
           "mark_complete"]

LOCK_FILE = "LOCK"
COMPLETE_FILE = "COMPLETE.json"


class OutputPathError(UserError):
    """A task name or an output path that would leave the output directory."""


def check_task_name(task_name: str, *, field: str = "task_name") -> str:
    """``task_name`` if it is one plain path component (no separator, not ``.``/``..``)."""
    bad = (not isinstance(task_name, str) or not task_name or task_name in (".", "..")
           or any(ch in task_name for ch in "/\\\0") or task_name != task_name.strip())
    if bad:
        raise OutputPathError(f"{field}={task_name!r}: must be a single plain folder name "
                              "(no '/', not '.' or '..')")
    return task_name


def inside(root: str | Path, *parts: str) -> Path:
    """``root/parts...`` resolved; `OutputPathError` if it is not under ``root``."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise OutputPathError(f"{path}: leaves the output directory {base}")
    return path


def check_writable(output_dir: str | Path) -> Path:
    """Create ``output_dir`` if needed and prove a file can be written there, or one line."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise EnvironmentFailure(f"{path}: output_dir exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".hfjax-write-test-{os.getpid()}"
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as e:
        raise EnvironmentFailure(f"{path}: output_dir is not writable "
                                 f"({e.strerror or type(e).__name__})") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TaskLock:
    """An exclusive lock on one task directory for a whole run (a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> TaskLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_create():
                self.held = True
                return self
            h = self.holder()
            pid, host = h.get("pid"), h.get("host")
            stale = (host == socket.gethostname() and isinstance(pid, int)
                     and not _pid_alive(pid))
            if not stale:
                who = f"pid {pid} on {host}" if pid is not None else "an unknown process"
                raise EnvironmentFailure(
                    f"{self.path.parent}: in use by another run ({who}, lock file "
                    f"{self.path}); wait for it, or delete the lock if that run is gone")
            self.path.unlink(missing_ok=True)  # stale: its holder died on this host
        raise EnvironmentFailure(f"{self.path}: cannot take the lock (contended)")

    def release(self) -> None:
        if self.held:
            if self.holder().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> TaskLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def clean_partial_exports(run_dir: str | Path) -> list[Path]:
    """Delete ``.<name>.tmp-*`` / ``.<name>.old-*`` left by an export that was killed."""
    removed = []
    root = Path(run_dir)
    if not root.is_dir():
        return removed
    for p in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync_tree(path: Path) -> None:
    """fsync every file under ``path`` (and the folders), so a marker written after is true."""
    if not path.exists():
        return
    items = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in items:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EBADF):
                raise
        finally:
            os.close(fd)


def mark_complete(run_dir: str | Path, outputs: list[str], info: dict[str, Any] | None = None
                  ) -> Path:
    """Fsync ``outputs`` (names under ``run_dir``), then write ``COMPLETE.json`` last."""
    root = Path(run_dir)
    for name in outputs:
        target = inside(root, name)
        if not target.exists():
            raise FileNotFoundError(f"{target}: missing, the run is not complete")
        _fsync_tree(target)
    return write_json_atomic(root / COMPLETE_FILE, {"outputs": list(outputs), **(info or {})})


def is_complete(run_dir: str | Path) -> bool:
    """Whether the task in ``run_dir`` finished (its marker exists; written last)."""
    return (Path(run_dir) / COMPLETE_FILE).is_file()


def clear_complete(run_dir: str | Path) -> None:
    """Remove the marker before outputs are rewritten (a rerun that trains again)."""
    (Path(run_dir) / COMPLETE_FILE).unlink(missing_ok=True)
