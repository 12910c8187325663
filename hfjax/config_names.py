"""Shipped configs by name: ``hfjax:NAME[:ARG]`` -> the file ``configs/NAME.py`` (+ ``:ARG``).

::

    resolve_config_name("hfjax:fuse")                  # ".../hfjax/configs/fuse.py"
    resolve_config_name("hfjax:paper:ablation/zero_source")
    # ".../hfjax/configs/paper.py:ablation/zero_source"  (get_config("ablation/zero_source"))
    resolve_config_name("hfjax:original_example")      # ".../original_example.yaml"
    resolve_config_name("my_run.py:arg")               # "my_run.py:arg" (not a name: unchanged)

The files are those of the package ``hfjax.configs`` (the repository's ``configs/``, wherever
it is installed; see `hfjax`), so a name works the same from a wheel, an editable install or
a checkout. The result is what ``load_config`` takes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hfjax.errors import UserError

__all__ = ["PREFIX", "ConfigNameError", "resolve_config_name", "shipped_config_names",
           "shipped_configs_dir"]

PREFIX = "hfjax:"
_SUFFIXES = (".py", ".yaml")


class ConfigNameError(UserError):
    """``hfjax:NAME`` names no shipped config."""


def shipped_configs_dir() -> Path:
    """The folder of the shipped configs (the package ``hfjax.configs``)."""
    spec = importlib.util.find_spec("hfjax.configs")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigNameError("hfjax.configs: the shipped configs are not installed "
                              "(reinstall hfjax)")
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_config_names() -> list[str]:
    """The names ``hfjax:NAME`` accepts, sorted."""
    root = shipped_configs_dir()
    return sorted(p.stem for p in root.iterdir()
                  if p.suffix in _SUFFIXES and not p.name.startswith("_"))


def resolve_config_name(spec: str) -> str:
    """``hfjax:NAME[:ARG]`` -> ``PATH[:ARG]`` of the shipped config; other specs unchanged.

    Raises `ConfigNameError` (one line, listing the names) for an unknown ``NAME``.
    """
    if not spec.startswith(PREFIX):
        return spec
    name, sep, arg = spec[len(PREFIX):].partition(":")
    root = shipped_configs_dir()
    if name not in shipped_config_names():
        raise ConfigNameError(f"{spec}: no shipped config {name!r}; shipped: "
                              + ", ".join(shipped_config_names()))
    path = next(root / f"{name}{suffix}" for suffix in _SUFFIXES
                if (root / f"{name}{suffix}").is_file())
    if sep and path.suffix != ".py":
        raise ConfigNameError(f"{spec}: {path.name} takes no argument (drop ':{arg}')")
    return f"{path}:{arg}" if sep else str(path)
