"""Reading config files: ``.py`` files (``FILE.py:ARG``), YAML, and multi-task chaining.

One loader per job kind, sharing every step (the schema conform, overrides, ``${VAR}`` and
``~`` expansion, locking)::

    load_config("configs/fuse.py")                          # [ConfigDict], get_config()
    load_config("configs/paper.py:sensitivity_alpha/0.05")  # get_config("sensitivity_alpha/0.05")
    load_config("run.yaml", ["train.lr=1e-4"])              # another release's YAML layout
    load_train_config("configs/train_lora.py", ["lora.r=16"])  # one ConfigDict

**Multi-task chaining** (what the original does): tasks run in order on one base model; each
task's export ``<output_dir>/<task_name>/merged_lora`` becomes the next task's target adapter,
and the transfer networks live in a cache keyed by ``(fusion_group_name, module type, rank)``,
so a later task with the same group name continues training the earlier task's networks
(with a fresh optimizer and fresh alphas). Both links are explicit: for task i > 0,
``target.from_task`` = the previous task's name and ``target.adapter_path`` = its export, and
``fusion.reuse_from`` = the latest earlier task with the same ``fusion.group_name`` (or ""). A
``.py`` config may return a list of ConfigDicts and set these links itself;
``target.adapter_path`` is then filled in from ``target.from_task``.

``${VAR}``, ``$VAR`` and ``${VAR:-default}`` are expanded from the environment in every string
field (``$$`` is a literal ``$``); an unset variable is a ``ConfigError`` naming the file, the
field and the variable. Unknown fields anywhere are a ``ConfigError`` that names the file and
the field and suggests the closest valid name. Values are checked when a config becomes a job
(`hfjax.config.jobs`).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from hfjax.config.overrides import apply_overrides, expand_env, expand_strings
from hfjax.config.problems import ConfigError
from hfjax.config.tree import ConfigDict, conform, get_field
from hfjax.config.yaml_layouts import load_yaml
from hfjax.configs import fuse as _fuse_schema
from hfjax.configs import train_lora as _lora_schema

__all__ = [
    "EXPORT_FILE",
    "EXPORT_SUBDIR",
    "chain_problems",
    "export_dir",
    "import_get_config",
    "is_finished",
    "load_config",
    "load_train_config",
]

# The export layout (the original's): <output_dir>/<task_name>/merged_lora/<EXPORT_FILE>.
EXPORT_SUBDIR = "merged_lora"
EXPORT_FILE = "adapter_model.safetensors"

# Fields that hold filesystem paths (``~`` is expanded in them), per job kind.
_FUSE_PATH_FIELDS = ("output_dir", "target.model_path", "target.adapter_path", "data.data_root")
_LORA_PATH_FIELDS = ("model_path", "data_root", "output_dir", "init_adapter")


def export_dir(cfg: Any) -> str:
    """Where a task's fused adapter goes: ``<output_dir>/<task_name>/merged_lora`` (a
    ConfigDict or a `FuseJob`)."""
    return os.path.join(cfg.output_dir, cfg.task_name, EXPORT_SUBDIR)


def is_finished(cfg: Any) -> bool:
    """True when the task's completion marker (``COMPLETE.json``, written after every output
    is in place) exists; a ``merged_lora/`` alone may be a killed run's."""
    from hfjax.run_dir import is_complete

    return is_complete(os.path.join(cfg.output_dir, cfg.task_name))


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"path.py:arg"`` -> (path.py, arg); anything else -> (spec, None)."""
    match = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec, flags=re.S)
    if match:
        return match.group(1), match.group(2)
    return spec, None


def import_get_config(file: str | os.PathLike[str]) -> Any:
    """The ``get_config`` function of a Python config file (ConfigError if there is none)."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: no such config file")
    module_name = f"_hfjax_config_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if get_config is None:
        raise ConfigError(f"{file}: defines no get_config()")
    return get_config


def _call_py(file: str, arg: str | None) -> tuple[Any, str]:
    """``get_config()`` / ``get_config(arg)`` of ``file`` and the label naming the call."""
    get_config = import_get_config(file)
    label = f"{file}:{arg}" if arg is not None else file
    try:
        return (get_config() if arg is None else get_config(arg)), label
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{label}: {e}") from e


def _expand_user(cfg: ConfigDict, fields: Sequence[str]) -> None:
    """``~`` in the path fields (and in every source's adapter_path)."""
    for path in fields:
        parent, _, leaf = path.rpartition(".")
        node = get_field(cfg, parent)
        node[leaf] = os.path.expanduser(node[leaf])
    for source in cfg.get("sources", ()):
        source.adapter_path = os.path.expanduser(source.adapter_path)


def _finish(cfg: ConfigDict, spec: str, overrides: Sequence[str],
            path_fields: Sequence[str]) -> None:
    """Overrides (environment expanded), ``~`` in the path fields."""
    overrides = [expand_env(item, where=f"{spec}: override {item!r}") for item in overrides]
    apply_overrides(cfg, overrides, where=f"{spec}: override")
    _expand_user(cfg, path_fields)


# --------------------------------------------------------------------------- chaining


def chain_problems(configs: Sequence[ConfigDict]) -> list[str]:
    """Problems with the links between the tasks of one file."""
    problems: list[str] = []
    seen: dict[str, ConfigDict] = {}
    for cfg in configs:
        if cfg.task_name in seen:
            problems.append(f"task_name={cfg.task_name!r}: two tasks of one file share a name")
        for field, earlier_name in (("target.from_task", cfg.target.from_task),
                                    ("fusion.reuse_from", cfg.fusion.reuse_from)):
            if earlier_name and earlier_name not in seen:
                problems.append(
                    f"{field}={earlier_name!r} (task {cfg.task_name!r}): no earlier task has "
                    "that name"
                )
        earlier = seen.get(cfg.fusion.reuse_from) if cfg.fusion.reuse_from else None
        if earlier is not None:
            for key in ("block_size", "embed_dim", "num_heads", "max_pos"):
                if earlier.fusion[key] != cfg.fusion[key]:
                    problems.append(
                        f"fusion.{key}={cfg.fusion[key]!r} (task {cfg.task_name!r}): reuses the "
                        f"networks of task {earlier.task_name!r}, which has "
                        f"{earlier.fusion[key]!r}; use another fusion.group_name"
                    )
        seen.setdefault(cfg.task_name, cfg)
    return problems


def _link_tasks(configs: Sequence[ConfigDict], file: str) -> None:
    """Points each chained task's target adapter at the earlier task's export."""
    problems = chain_problems(configs)
    if problems:
        raise ConfigError(f"{file}: {problems[0]}", [f"{file}: {p}" for p in problems])
    by_name = {cfg.task_name: cfg for cfg in configs}
    for cfg in configs:
        if cfg.target.from_task:
            cfg.target.adapter_path = export_dir(by_name[cfg.target.from_task])


# --------------------------------------------------------------------------- load


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> list[ConfigDict]:
    """Loads a fuse config file into one locked ConfigDict per task, in order.

    ``path`` is a ``.py`` file (``get_config()``, or ``get_config(ARG)`` with ``FILE.py:ARG``,
    returning a ConfigDict or a list of them) or a ``.yaml``/``.yml`` file in another
    release's layout (`hfjax.config.yaml_layouts`). ``overrides`` (``"train.lr=1e-4"``,
    environment variables expanded) apply to every task, before chained tasks' target
    adapters are pointed at the earlier exports. Raises ``ConfigError`` for unknown fields,
    bad types, unset variables and broken chains; `to_fuse_job` / `validate_configs` check
    the values and paths.
    """
    spec = os.fspath(path)
    file, arg = _split_spec(spec)
    suffix = Path(file).suffix.lower()
    if suffix == ".py":
        result, label = _call_py(file, arg)
        configs = list(result) if isinstance(result, (list, tuple)) else [result]
        if not configs or not all(isinstance(c, ConfigDict) for c in configs):
            raise ConfigError(f"{label}: get_config() must return a ConfigDict or a list of them")
        configs = [expand_strings(conform(c, _fuse_schema.get_config(), label), label)
                   for c in configs]
    elif suffix in (".yaml", ".yml"):
        configs = load_yaml(file)
    else:
        raise ConfigError(f"{spec}: expected a .py, .yaml or .yml config file")
    for cfg in configs:
        _finish(cfg, spec, overrides, _FUSE_PATH_FIELDS)
    _link_tasks(configs, spec)
    for cfg in configs:
        cfg.lock()
        for source in cfg.sources:
            source.lock()
    return configs


def _read_train_file(spec: str) -> ConfigDict:
    file, arg = _split_spec(spec)
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: no such config file")
    suffix = path.suffix.lower()
    if suffix == ".py":
        user, label = _call_py(file, arg)
        if not isinstance(user, ConfigDict):
            raise ConfigError(f"{label}: get_config() must return a ConfigDict")
        return conform(user, _lora_schema.get_config(), label)
    if suffix in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: cannot parse ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of fields")
        return conform(data, _lora_schema.get_config(), file)
    raise ConfigError(f"{spec}: expected a .py, .yaml, .yml or .json config file")


def load_train_config(path: str | os.PathLike[str] | None = None,
                      overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads a train-lora config (schema: ``configs/train_lora.py``) into a locked ConfigDict.

    ``path`` is a ``.py`` file with ``get_config()`` (``FILE.py:ARG`` calls
    ``get_config(ARG)``), a ``.yaml``/``.json`` mapping of fields (nested sections or the
    schema's nesting), or ``None`` for the defaults. ``overrides`` are ``"train.lr=3e-4"``
    strings (``--config.`` prefix accepted). ``${VAR}`` / ``$VAR`` are expanded in every
    string field and ``~`` in the path fields. Unknown fields and wrong types raise
    `ConfigError` naming the file and the field; `to_lora_job` checks the values.
    """
    spec = "defaults" if path is None else os.fspath(path)
    cfg = _lora_schema.get_config() if path is None else _read_train_file(spec)
    apply_overrides(cfg, [expand_env(o, where=f"{spec}: override {o!r}") for o in overrides],
                    where=f"{spec}: override")
    expand_strings(cfg, spec)
    _expand_user(cfg, _LORA_PATH_FIELDS)
    cfg.lock()
    return cfg

