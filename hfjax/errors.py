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
