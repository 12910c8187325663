"""The one reader of ``sources`` and the one naming rule for sources given without a name.

Every way of writing sources ends here: the command line (``"name=path,path"`` or a literal
list), a ``.py`` config (a string, or dicts with an optional name), the original's YAML
(``source_lora_paths``) and a ConfigDict handed straight to ``run_fusion``. A source without
a name is named after its folder: the last path component, extended leftwards while it is
generic (``ET_Fab/sft``, ``x/checkpoint-500``) or not unique among the sources::

    source_names(["/a/RE_conll04", "/b/ET_Fab/sft", "/c/ET_Find/sft"])
    # ["RE_conll04", "ET_Fab/sft", "ET_Find/sft"]
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hfjax.config.problems import ConfigError
from hfjax.config.tree import ConfigDict

__all__ = ["parse_sources", "source_entries", "source_items", "source_names", "sources_config"]

_GENERIC_DIR_NAMES = {"sft", "lora", "adapter", "merged_lora", "final", "best"}
_HINT = "use {'name': ..., 'adapter_path': ...}, (name, path) or a path"


def source_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for adapter folders (see the module docstring)."""
    parts = [Path(str(p).rstrip("/\\")).parts or (str(p),) for p in paths]
    depth = [1] * len(paths)

    def generic(name: str) -> bool:
        return name.lower() in _GENERIC_DIR_NAMES or bool(re.fullmatch(r"checkpoint-\d+", name))

    for i, pp in enumerate(parts):
        while depth[i] < len(pp) and generic(pp[-depth[i]]):
            depth[i] += 1
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth, strict=True)]
        grew = False
        for i, name in enumerate(names):
            if names.count(name) > 1 and depth[i] < len(parts[i]):
                depth[i] += 1
                grew = True
        if not grew:
            return names


def _named(items: Sequence[tuple[str | None, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``(name or None, path, options)`` -> entry dicts, missing names from the folder names."""
    derived = source_names([path for _, path, _ in items])
    return [{"name": name or auto, "adapter_path": path, **extras}
            for (name, path, extras), auto in zip(items, derived, strict=True)]


def _parse_text(text: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    text = text.strip()
    if not text:
        return []
    items: list[tuple[str | None, str, dict[str, Any]]] = []
    if text[0] not in "[(":
        for chunk in text.split(","):
            chunk = chunk.strip()
            if chunk:
                name, sep, path = chunk.partition("=")
                items.append((name.strip(), path.strip(), {}) if sep else (None, chunk, {}))
        return items
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        parsed = yaml.safe_load(text)
    for entry in parsed:
        if isinstance(entry, (tuple, list)) and len(entry) == 2:
            items.append((str(entry[0]), str(entry[1]), {}))
        else:
            items.append(_entry(entry, "sources"))
    return items


def _option_keys() -> set[str]:
    """The fields one source entry may carry (`configs.fuse.source_defaults`)."""
    from hfjax.configs.fuse import source_defaults

    return set(source_defaults().keys())


def _entry(entry: Any, label: str) -> tuple[str | None, str, dict[str, Any]]:
    """One written source: a path, or a mapping {adapter_path, name (optional), options}."""
    if isinstance(entry, str):
        return None, entry, {}
    keys = set(entry.keys()) if isinstance(entry, (Mapping, ConfigDict)) else None
    if keys is None or not keys <= _option_keys():
        raise ConfigError(f"{label}: cannot read entry {entry!r}; {_HINT}")
    if "adapter_path" not in keys:
        raise ConfigError(f"{label}: entry {dict(entry)!r} has no adapter_path")
    extras = {k: entry[k] for k in keys - {"name", "adapter_path"}}
    return entry.get("name") or None, str(entry["adapter_path"]), extras


def source_items(value: Any, label: str = "sources") -> list[dict[str, Any]]:
    """``sources`` in any written form -> one dict per source, every name filled in.

    Accepted: ``"name=path,name=path"``, ``"path,path"``, a Python/YAML literal list (of
    dicts, ``(name, path)`` pairs or paths), or a sequence of dicts / ConfigDicts with an
    optional ``name`` and the options of `configs.fuse.source_defaults`. Paths containing
    ``,`` or ``=`` need a literal or a mapping.
    """
    if isinstance(value, str):
        return _named(_parse_text(value))
    items = []
    for i, entry in enumerate(value or ()):
        try:
            items.append(_entry(entry, f"{label}.{i}"))
        except ConfigError:
            raise ConfigError(f"{label}.{i}={entry!r}: expected {{name, adapter_path}}") from None
    return _named(items)


def source_entries(value: Any, label: str = "sources") -> list[tuple[str, str]]:
    """`source_items` as ``[(name, adapter_path)]``."""
    return [(d["name"], d["adapter_path"]) for d in source_items(value, label)]


def sources_config(value: Any, label: str = "sources") -> tuple[ConfigDict, ...]:
    """`source_items` as the schema stores them: ConfigDicts {name, adapter_path, ...}."""
    return tuple(ConfigDict(d) for d in source_items(value, label))


def parse_sources(text: str) -> tuple[ConfigDict, ...]:
    """A command-line ``sources`` value as the schema stores it (see `source_entries`)."""
    return sources_config(text)
