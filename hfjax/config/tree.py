"""Walking and filling `ml_collections.ConfigDict` trees by dotted field path."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import ml_collections

from hfjax.config.problems import ConfigError, suggest

__all__ = ["ConfigDict", "assign", "config_to_dict", "conform", "get_field", "leaf_paths"]

ConfigDict = ml_collections.ConfigDict


def leaf_paths(cfg: ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (dotted path, value) for every non-ConfigDict field of ``cfg``."""
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            yield from leaf_paths(value, path + ".")
        else:
            yield path, value


def get_field(cfg: ConfigDict, path: str) -> Any:
    """The value at a dotted ``path`` ("" is ``cfg`` itself)."""
    node: Any = cfg
    for part in path.split(".") if path else ():
        node = node[part]
    return node


def assign(node: ConfigDict, key: str, value: Any, *, label: str) -> None:
    """``node[key] = value`` with ConfigDict's type check (and no bool for numbers)."""
    field_type = node.get_type(key)
    if isinstance(value, bool) and field_type in (int, float):
        raise ConfigError(f"{label}={value!r}: expected {field_type.__name__}, got bool")
    if isinstance(value, list) and field_type is tuple:
        value = tuple(value)
    try:
        node[key] = value
    except TypeError:
        raise ConfigError(
            f"{label}={value!r}: expected {field_type.__name__}, got {type(value).__name__}"
        ) from None


def conform(user: Any, schema: ConfigDict, label: str) -> ConfigDict:
    """``schema`` (a fresh default config) overlaid with ``user``'s fields, in place.

    ``user`` is a ConfigDict or a nested mapping; an unknown field is a `ConfigError` naming
    ``label`` and the field, with the closest valid name. A ``sources`` field is normalised
    to ``{name, adapter_path}`` ConfigDicts (`hfjax.config.sources`).
    """
    from hfjax.config.sources import sources_config

    if not isinstance(user, ConfigDict):
        user = ConfigDict(dict(user))
    valid = [p for p, _ in leaf_paths(schema)]
    for path, value in leaf_paths(user):
        if path not in valid:
            raise ConfigError(f"{label}: unknown field '{path}'{suggest(path, valid)}")
        if path == "sources":
            value = sources_config(value, f"{label}: sources")
        parent, _, leaf = path.rpartition(".")
        assign(get_field(schema, parent), leaf, copy.deepcopy(value), label=f"{label}: {path}")
    return schema


def config_to_dict(cfg: ConfigDict) -> dict[str, Any]:
    """Plain dicts/lists/scalars (for JSON/YAML dumps next to a run's outputs)."""

    def plain(value: Any) -> Any:
        if isinstance(value, ConfigDict):
            return {k: plain(value[k]) for k in value.keys()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)
