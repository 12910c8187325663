"""Command-line overrides (``--config.train.lr=1e-4``) and ``${VAR}`` environment expansion."""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from hfjax.config.problems import ConfigError, suggest
from hfjax.config.sources import parse_sources
from hfjax.config.tree import ConfigDict, assign, leaf_paths

__all__ = ["apply_overrides", "expand_env", "expand_strings"]

_ENV_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<dollar>\$))"
)


def expand_env(text: str, *, where: str = "config") -> str:
    """Expands ``${VAR}``, ``$VAR`` and ``${VAR:-default}``; ``$$`` is a literal ``$``.

    An unset variable (without a default) raises ``ConfigError`` naming ``where``.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("dollar"):
            return "$"
        name = match.group("braced") or match.group("bare")
        default = match.group("default")
        value = os.environ.get(name)
        if default is not None and not value:
            return default
        if value is None:
            raise ConfigError(f"{where}: environment variable {name} is not set")
        return value

    return _ENV_RE.sub(replace, text)


def expand_strings(value: Any, where: str, path: str = "") -> Any:
    """``expand_env`` applied to every string inside nested dicts/lists/tuples/ConfigDicts
    (ConfigDicts in place); ``path`` names the field in error messages."""
    if isinstance(value, str):
        return expand_env(value, where=f"{where}: field '{path}'")
    if isinstance(value, ConfigDict):
        for key in value.keys():
            old = value[key]
            new = expand_strings(old, where, f"{path}.{key}" if path else key)
            if new is not old:
                value[key] = new
        return value
    if isinstance(value, Mapping):
        return {k: expand_strings(v, where, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [expand_strings(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    return value


def _parse_value(raw: str, field_type: type) -> Any:
    """A command-line string as a value for a field of ``field_type`` (type-checked later)."""
    if field_type is str:
        return raw
    text = raw.strip()
    if field_type is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if field_type in (tuple, list):
        if text[:1] in "[(":
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return raw
            return tuple(value) if isinstance(value, list) else value
        return tuple(x.strip() for x in text.split(",") if x.strip())
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return raw


def _override_one(cfg: ConfigDict, key: str, raw: Any, *, where: str) -> None:
    """Sets one dotted field; ``raw`` is a string (command line) or an already-typed value."""
    parts = key.split(".")
    node: Any = cfg
    valid = [p for p, _ in leaf_paths(cfg)]
    unknown = ConfigError(f"{where}: unknown field '{key}'{suggest(key, valid)}")
    for part in parts[:-1]:
        if isinstance(node, ConfigDict) and part in node:
            node = node[part]
        elif isinstance(node, tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise unknown
    leaf = parts[-1]
    if not isinstance(node, ConfigDict) or leaf not in node:
        raise unknown
    if key == "sources" and isinstance(raw, str):
        value: Any = parse_sources(raw)
    elif isinstance(raw, str):
        value = _parse_value(raw, node.get_type(leaf))
    else:
        value = raw
    assign(node, leaf, value, label=f"{where}: {key}")


def apply_overrides(
    cfg: ConfigDict, overrides: Sequence[str], *, where: str = "override"
) -> ConfigDict:
    """Applies ``["train.lr=1e-4", "sources=a=/p,b=/q", ...]`` to ``cfg`` in place.

    A leading ``--config.`` / ``config.`` is accepted (so ``--config.x=y`` flags can be passed
    as they are). Values are parsed for the field's type (numbers and bools as Python
    literals, tuples as ``a,b`` or a literal, strings verbatim) and then type-checked by
    ConfigDict; an unknown field or a wrong type raises ``ConfigError`` naming the field.
    Elements of ``sources`` are addressed as ``sources.0.adapter_path``. Returns ``cfg``.
    """
    for item in overrides:
        text = item
        for prefix in ("--config.", "config."):
            if text.startswith(prefix):
                text = text[len(prefix):]
                break
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: expected FIELD=VALUE, got {item!r}")
        _override_one(cfg, key.strip(), raw, where=where)
    return cfg
