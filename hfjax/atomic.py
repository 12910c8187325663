"""Atomic file writes: a temporary file beside the target, fsync, then one rename.

A reader (or a crash) sees the old file or the new one, never half of one::

    write_json_atomic(run_dir / "train_report.json", report)          # indent 2, newline
    write_text_atomic(out / "predictions.jsonl", "".join(lines))
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic", "write_text_atomic"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; the parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file an ordinary mode
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None,
                      ensure_ascii: bool = True) -> Path:
    """``data`` as JSON (plus a final newline) written atomically to ``path``."""
    text = json.dumps(data, indent=indent, default=default, ensure_ascii=ensure_ascii)
    return write_text_atomic(path, text + "\n")
