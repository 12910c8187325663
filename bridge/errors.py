"""The two errors `bridge` raises for bad files.

Both are ``ValueError`` subclasses whose message is one line, ``"{file}: {problem}"``: the
file that is wrong first, then what is wrong with it, naming the field, tensor or module::

    AdapterError: /ckpt/expert/adapter_config.json: use_dora is True; DoRA is not supported

Raise them as ``AdapterError(file, problem)``; ``AdapterError("file: problem")`` (one ready-made
message) works too.
"""

from __future__ import annotations

import os

__all__ = ["AdapterError", "CheckpointError", "UserError"]


class UserError(ValueError):
    """Bad input the user can fix (a file, a field, a value): the CLI prints its one-line message
    and exits 2, without a traceback. Every input check in `bridge` and `hfjax` raises a subclass;
    any other exception is treated as a bug."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


class _FileError(UserError):
    """`UserError` with a one-line ``"{file}: {problem}"`` message."""

    def __init__(self, file: str | os.PathLike[str], problem: str | None = None) -> None:
        if problem is None:  # one ready-made message
            self.file, self.problem = "", _one_line(file)
            super().__init__(self.problem)
            return
        self.file = os.fspath(file)
        self.problem = _one_line(problem)
        super().__init__(f"{self.file}: {self.problem}")


class AdapterError(_FileError):
    """A PEFT LoRA adapter directory we cannot read, or refuse to read or write faithfully."""


class CheckpointError(_FileError):
    """A Hugging Face model checkpoint (config.json + safetensors) we cannot read or write."""
