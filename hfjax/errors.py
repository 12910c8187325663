"""The error classes the CLI maps to exit codes, and the codes themselves.

- `UserError` (a `ValueError`): bad input, a file, a field or a value the user can fix.
  CLI: one line, exit 2.
- `EnvironmentFailure`: the machine, not the input (disk full, permission, lock held).
  CLI: one line, exit 3.
- `RunDiverged`: the run itself stopped on a non-finite loss, or on non-finite parameters
  before a checkpoint (`hfjax.training.loop` never saves them); the message names the last
  good checkpoint. CLI: one line, exit 4.
- anything else is a bug. CLI: the traceback and a line asking to report it, exit 1.

Every input check raises a `UserError` subclass that names the file and the field; `bridge`
defines the base class (it sits below `hfjax`), this module re-exports it.
"""

from __future__ import annotations

import errno

from bridge.errors import UserError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BUG",
    "EXIT_DIVERGED",
    "EXIT_ENVIRONMENT",
    "EXIT_INTERRUPTED",
    "EnvironmentFailure",
    "RunDiverged",
    "UserError",
    "machine_error",
]

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_ENVIRONMENT = 3
EXIT_DIVERGED = 4
EXIT_INTERRUPTED = 130


class EnvironmentFailure(RuntimeError):
    """The machine refused: disk full, no permission, an output directory held by another run."""


class RunDiverged(RuntimeError):
    """A training run stopped on a non-finite loss or non-finite parameters."""


# What orbax/tensorstore say (in a ValueError's text) when the machine refuses a write.
_MACHINE_ERRORS = {errno.ENOSPC: ("No space left on device", "os_error_code='28'"),
                   errno.EACCES: ("Permission denied", "os_error_code='13'"),
                   errno.EROFS: ("Read-only file system", "os_error_code='30'"),
                   errno.EDQUOT: ("Disk quota exceeded", "os_error_code='122'")}


def machine_error(e: BaseException) -> int | None:
    """The errno of a disk-full / permission / read-only failure inside ``e`` (its causes and
    orbax's wrapped texts included), or None for anything else."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _MACHINE_ERRORS:
            return e.errno
        text = str(e)
        for code, marks in _MACHINE_ERRORS.items():
            if any(m in text for m in marks):
                return code
        e = e.__cause__ or e.__context__
    return None
