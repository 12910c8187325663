"""`ConfigError` and the small helpers every config check shares (one line per problem)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from hfjax.errors import UserError

__all__ = ["ConfigError", "is_number", "problem", "raise_problems", "suggest"]


class ConfigError(UserError):
    """A config problem, reported before any work starts. One line per problem."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


def suggest(name: str, valid: Sequence[str]) -> str:
    """'; did you mean 'x'?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def problem(field: str, value: Any, why: str) -> str:
    """The one-line form every check uses: ``field=value: why``."""
    return f"{field}={value!r}: {why}"


def raise_problems(problems: Sequence[str]) -> None:
    """Raise one `ConfigError` listing ``problems`` (one per line); nothing if empty."""
    if problems:
        raise ConfigError("\n".join(problems), problems)
