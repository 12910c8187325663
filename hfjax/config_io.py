"""Loading, overriding and validating fuse configs (the schema is ``configs/fuse.py``).

Two kinds of config file load into the same ``ml_collections.ConfigDict`` schema, one per
task, in order::

    load_config("configs/fuse.py")                          # get_config()
    load_config("configs/paper.py:sensitivity_alpha/0.05")  # get_config("sensitivity_alpha/0.05")
    load_config("run.yaml", ["train.lr=1e-4"])              # the original release's layout

**The original's YAML layout** (ECNU-ICALK/HeteroFusion ``main.py``; one file = one pipeline)::

    experiment_name: paper_single_source_qwen_to_llama    # a label       -> experiment_name
    output_dir: outputs/paper/...                         # run root      -> output_dir
    base_model_path: "${MODEL_ROOT}/llama-3.1-8b-instruct"                -> target.model_path
    initial_target_lora: "${ADAPTER_ROOT}/llama_instruct/NER_mit-movie_sft"
                                                 # the FIRST task's target -> target.adapter_path
    seed: 42                                     # (later release)        -> seed
    data_global:
      dataset_dir: data                                                   -> data.data_root
      template: llama3                                                    -> target.template
      cutoff_len: 1024                                                    -> data.cutoff_len
      batch_size: 1                                                       -> train.batch_size
      num_workers: 4                             # torch DataLoader only: accepted, ignored
    tasks:
    - task_name: single_source_transfer                                   -> task_name
      source_lora_paths: ["${ADAPTER_ROOT}/Qwen2.5/UIE/RE_conll04", ...]  -> sources
      # (or source_lora_path: one path)
      transfer_ratio: '1'                        # float or "a/b"         -> fusion.transfer_ratio
      layer_alignment: tail                      # (later release) only "tail" is supported
      seed: 42                                   # (later release)        -> seed
      datasets:                                  # mains first, then replays -> data.datasets
      - {name: TweetNER7_sample_15000_sample300, type: main}
      - {name: mit-movie_sample300, type: replay, ratio: all}   # only ratio "all" is supported
      training:
        fusion_group_name: heterofusion_transfer                          -> fusion.group_name
        embed_dim: 1024 / num_heads: 8 / mu_gate: 0.1 / alpha_init: 0.3   -> fusion.*
        max_position_embeddings: 4096                                     -> fusion.max_pos
        block_size: 4096                         # (later release)        -> fusion.block_size
        num_epochs: 3 / lr: 5.0e-05                                       -> train.epochs / train.lr
        gradient_accumulation_steps: 8                                    -> train.grad_accum
        lambda_reg / mu_target / sigma_target / num_projections           -> rdm.*
        update_mode: b_only                      # (later release) only "b_only" is supported
        seed: 42                                                          -> seed
        # hfjax extras: any schema field, by bare name (warmup_ratio, remat, min_bucket, ...)
        # or dotted path (train.warmup_ratio, mesh.fsdp), or as a nested section (train: {...}).

A field given at two levels (say ``batch_size`` in ``data_global`` and in ``training``) must
agree, or it is an error. A training key left out takes the original CODE's default, not the
paper's (``mu_gate`` -0.5, ``lambda_reg`` 0.1, ``mu_target`` -1, ``num_projections`` 1024,
``alpha_init`` 0.1; ``lr``, ``num_epochs``, ``data_global.template`` and ``batch_size`` are
required), so a file behaves as it would in the original; hfjax-only fields left out take
``configs/fuse.py``'s defaults. Relative paths stay relative to the working directory (the
original resolves them against its repository root, where its runner is started).

**Multi-task chaining** (what the original does): tasks run in order on one base model; each
task's export ``<output_dir>/<task_name>/merged_lora`` becomes the next task's target adapter,
and the transfer networks live in a cache keyed by ``(fusion_group_name, module type, rank)``,
so a later task with the same group name continues training the earlier task's networks
(with a fresh optimizer and fresh alphas). We record both links explicitly: for task i > 0,
``target.from_task`` = the previous task's name and ``target.adapter_path`` = its export, and
``fusion.reuse_from`` = the latest earlier task with the same ``fusion.group_name`` (or ""). A
``.py`` config may return a list of ConfigDicts and set these links itself;
``target.adapter_path`` is then filled in from ``target.from_task``.

``${VAR}``, ``$VAR`` and ``${VAR:-default}`` are expanded from the environment in every string
field (``$$`` is a literal ``$``); an unset variable is a ``ConfigError`` naming the file, the
field and the variable. Unknown fields anywhere are a ``ConfigError`` that names the file and
the field and suggests the closest valid name.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import yaml

from configs import fuse as _fuse_schema
from hfjax.errors import UserError
from hfjax.models.families import FAMILIES as _FAMILIES
from hfjax.training.templates import TEMPLATES as _CHAT_TEMPLATES

__all__ = [
    "ConfigError",
    "TEMPLATES",
    "apply_overrides",
    "config_to_dict",
    "expand_env",
    "export_dir",
    "is_finished",
    "load_config",
    "parse_sources",
    "parse_transfer_ratio",
    "resolve_template",
    "validate_config",
    "validate_configs",
]

ConfigDict = ml_collections.ConfigDict

# Values the schema's enumerated fields accept.
TEMPLATES = (*_CHAT_TEMPLATES, "auto")
TEMPLATE_BY_MODEL_TYPE = {name: f.template for name, f in _FAMILIES.items()}
GATES = ("svd", "open")
LAYER_ALIGNMENTS = ("tail", "head", "naive", "uniform")  # = hfjax.fusion.plan's (a test checks)
UPDATE_MODES = ("b_only", "a_only", "ab_joint")  # = hfjax.fusion.plan's (a test checks)
ACTIVATIONS = ("relu", "prelu")
RDM_SORTS = ("auto", "xla", "host")
BASE_DTYPES = ("bfloat16", "float32")
MESH_AXES = ("data", "fsdp", "tensor")

# The export layout (the original's): <output_dir>/<task_name>/merged_lora/<EXPORT_FILE>.
EXPORT_SUBDIR = "merged_lora"
EXPORT_FILE = "adapter_model.safetensors"

# Fields that hold filesystem paths (``~`` is expanded in them).
_PATH_FIELDS = ("output_dir", "target.model_path", "target.adapter_path", "data.data_root")


class ConfigError(UserError):
    """A config problem, reported before any work starts. One line per problem."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


# --------------------------------------------------------------------------- small helpers


def _suggest(name: str, valid: Sequence[str]) -> str:
    """'; did you mean 'x'?' for the closest valid name, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _leaf_paths(cfg: ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yields (dotted path, value) for every non-ConfigDict field of ``cfg``."""
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            yield from _leaf_paths(value, path + ".")
        else:
            yield path, value


def _schema() -> ConfigDict:
    """A fresh default config: the schema every loaded config conforms to."""
    return _fuse_schema.get_config()


def _get(cfg: ConfigDict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = node[part]
    return node


def export_dir(cfg: ConfigDict) -> str:
    """Where a task's fused adapter goes: ``<output_dir>/<task_name>/merged_lora``."""
    return os.path.join(cfg.output_dir, cfg.task_name, EXPORT_SUBDIR)


def is_finished(cfg: ConfigDict) -> bool:
    """True when the task's exported ``adapter_model.safetensors`` exists."""
    return os.path.isfile(os.path.join(export_dir(cfg), EXPORT_FILE))


def resolve_template(template: str, model_type: str) -> str:
    """The chat template to use: ``template`` itself, or for "auto" the one of ``model_type``."""
    if template != "auto":
        return template
    try:
        return TEMPLATE_BY_MODEL_TYPE[model_type]
    except KeyError:
        raise ConfigError(
            f"target.template='auto': no template known for model_type {model_type!r}; "
            f"set target.template to one of {TEMPLATES[:-1]}"
        ) from None


def parse_transfer_ratio(value: Any) -> float:
    """``transfer_ratio`` as a float: a number, a numeric string, or ``"a/b"``."""
    if isinstance(value, bool):
        raise ConfigError(f"fusion.transfer_ratio={value!r}: expected a number or 'a/b'")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            if "/" in value:
                num, den = value.split("/")
                return float(num) / float(den)
            return float(value)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"fusion.transfer_ratio={value!r}: expected a number or 'a/b'")


_GENERIC_DIR_NAMES = {"sft", "lora", "adapter", "merged_lora", "final", "best"}


def _source_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for adapter folders: the last path component, extended leftwards
    (``ET_Fab/sft``) while it is generic (``sft``, ``checkpoint-500``) or not unique."""
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


def _make_sources(items: Sequence[tuple[str | None, str]]) -> tuple[ConfigDict, ...]:
    """ConfigDicts {name, adapter_path}; missing names come from the folder names."""
    derived = _source_names([path for _, path in items])
    return tuple(
        ConfigDict({"name": name or auto, "adapter_path": path})
        for (name, path), auto in zip(items, derived, strict=True)
    )


def parse_sources(text: str) -> tuple[ConfigDict, ...]:
    """Parses a command-line ``sources`` value.

    Accepted: ``"name=path,name=path"``, ``"path,path"`` (names from the folder names), or a
    Python/YAML literal list of ``{"name": ..., "adapter_path": ...}`` dicts, ``(name, path)``
    pairs or paths. Paths containing ``,`` or ``=`` need the literal form.
    """
    text = text.strip()
    if not text:
        return ()
    items: list[tuple[str | None, str]] = []
    if text[0] in "[(":
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parsed = yaml.safe_load(text)
        for entry in parsed:
            if isinstance(entry, str):
                items.append((None, entry))
            elif isinstance(entry, Mapping) and set(entry) <= {"name", "adapter_path"}:
                if "adapter_path" not in entry:
                    raise ConfigError(f"sources: entry {dict(entry)!r} has no adapter_path")
                items.append((entry.get("name"), str(entry["adapter_path"])))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                items.append((str(entry[0]), str(entry[1])))
            else:
                raise ConfigError(
                    f"sources: cannot read entry {entry!r}; use "
                    "{'name': ..., 'adapter_path': ...}, (name, path) or a path"
                )
    else:
        for chunk in text.split(","):
            chunk = chunk.strip()
            if not chunk:
                continue
            name, sep, path = chunk.partition("=")
            items.append((name.strip(), path.strip()) if sep else (None, chunk))
    return _make_sources(items)


def config_to_dict(cfg: ConfigDict) -> dict[str, Any]:
    """Plain dicts/lists/scalars (for JSON/YAML dumps next to a run's outputs)."""

    def plain(value: Any) -> Any:
        if isinstance(value, ConfigDict):
            return {k: plain(value[k]) for k in value.keys()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


# --------------------------------------------------------------------------- environment

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


def _expand_strings(value: Any, where: str, path: str = "") -> Any:
    """``expand_env`` applied to every string inside nested dicts/lists/tuples/ConfigDicts
    (ConfigDicts in place); ``path`` names the field in error messages."""
    if isinstance(value, str):
        return expand_env(value, where=f"{where}: field '{path}'")
    if isinstance(value, ConfigDict):
        for key in value.keys():
            old = value[key]
            new = _expand_strings(old, where, f"{path}.{key}" if path else key)
            if new is not old:
                value[key] = new
        return value
    if isinstance(value, Mapping):
        return {k: _expand_strings(v, where, f"{path}.{k}" if path else str(k))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_expand_strings(v, where, f"{path}[{i}]") for i, v in enumerate(value)]
        if all(a is b for a, b in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    return value


def _expand_user(cfg: ConfigDict) -> None:
    """``~`` in the path fields."""
    for path in _PATH_FIELDS:
        parent, _, leaf = path.rpartition(".")
        node = _get(cfg, parent) if parent else cfg
        node[leaf] = os.path.expanduser(node[leaf])
    for source in cfg.sources:
        source.adapter_path = os.path.expanduser(source.adapter_path)


# --------------------------------------------------------------------------- overrides


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


def _assign(node: ConfigDict, key: str, value: Any, *, label: str) -> None:
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


def _override_one(cfg: ConfigDict, key: str, raw: Any, *, where: str) -> None:
    """Sets one dotted field; ``raw`` is a string (command line) or an already-typed value."""
    parts = key.split(".")
    node: Any = cfg
    valid = [p for p, _ in _leaf_paths(cfg)]
    unknown = ConfigError(f"{where}: unknown field '{key}'{_suggest(key, valid)}")
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
    label = f"{where}: {key}"
    if key == "sources" and isinstance(raw, str):
        value: Any = parse_sources(raw)
    elif isinstance(raw, str):
        value = _parse_value(raw, node.get_type(leaf))
    else:
        value = raw
    _assign(node, leaf, value, label=label)


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


# --------------------------------------------------------------------------- .py configs


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"path.py:arg"`` -> (path.py, arg); anything else -> (spec, None)."""
    match = re.fullmatch(r"(.+?\.py)(?::(.*))?", spec, flags=re.S)
    if match:
        return match.group(1), match.group(2)
    return spec, None


def _conform(user: ConfigDict, file: str) -> ConfigDict:
    """The schema's defaults overlaid with ``user``'s fields; unknown fields are errors."""
    cfg = _schema()
    valid = [p for p, _ in _leaf_paths(cfg)]
    for path, value in _leaf_paths(user):
        if path not in valid:
            raise ConfigError(f"{file}: unknown field '{path}'{_suggest(path, valid)}")
        if path == "sources":
            value = _normalize_sources(value, f"{file}: sources")
        parent, _, leaf = path.rpartition(".")
        node = _get(cfg, parent) if parent else cfg
        _assign(node, leaf, copy.deepcopy(value), label=f"{file}: {path}")
    return cfg


def _normalize_sources(value: Any, label: str) -> tuple[ConfigDict, ...]:
    """``sources`` as written in a .py config (a string, or dicts / ConfigDicts, a name
    optional) -> a tuple of ConfigDicts {name, adapter_path}."""
    if isinstance(value, str):
        return parse_sources(value)
    items: list[tuple[str | None, str]] = []
    for i, entry in enumerate(value):
        keys = set(entry.keys()) if isinstance(entry, (Mapping, ConfigDict)) else None
        if keys is None or "adapter_path" not in keys or not keys <= {"name", "adapter_path"}:
            raise ConfigError(f"{label}.{i}={entry!r}: expected {{name, adapter_path}}")
        items.append((entry.get("name"), entry["adapter_path"]))
    return _make_sources(items)


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


def _load_py(file: str, arg: str | None) -> list[ConfigDict]:
    get_config = import_get_config(file)
    label = f"{file}:{arg}" if arg is not None else file
    try:
        result = get_config() if arg is None else get_config(arg)
    except ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{label}: {e}") from e
    configs = list(result) if isinstance(result, (list, tuple)) else [result]
    if not configs or not all(isinstance(c, ConfigDict) for c in configs):
        raise ConfigError(f"{label}: get_config() must return a ConfigDict or a list of them")
    return [_expand_strings(_conform(c, label), label) for c in configs]


# --------------------------------------------------------------------------- original YAML

_TOP_FIELDS = (
    "experiment_name", "output_dir", "base_model_path", "initial_target_lora", "data_global",
    "tasks", "seed",
)
# data_global field -> our field (None: accepted and ignored).
_DATA_GLOBAL_FIELDS: dict[str, str | None] = {
    "dataset_dir": "data.data_root",
    "template": "target.template",
    "cutoff_len": "data.cutoff_len",
    "batch_size": "train.batch_size",
    "num_workers": None,
}
_TASK_FIELDS = (
    "task_name", "source_lora_paths", "source_lora_path", "transfer_ratio", "layer_alignment",
    "seed", "datasets", "training",
)
_DATASET_FIELDS = ("name", "type", "ratio")
# The original's training-block names -> our fields (None: checked, then dropped).
_ORIGINAL_TRAINING_FIELDS: dict[str, str | None] = {
    "fusion_group_name": "fusion.group_name",
    "lpka_group_name": "fusion.group_name",
    "block_size": "fusion.block_size",
    "embed_dim": "fusion.embed_dim",
    "num_heads": "fusion.num_heads",
    "max_position_embeddings": "fusion.max_pos",
    "mu_gate": "fusion.mu_gate",
    "alpha_init": "fusion.alpha_init",
    "num_epochs": "train.epochs",
    "lr": "train.lr",
    "gradient_accumulation_steps": "train.grad_accum",
    "lambda_reg": "rdm.lambda_reg",
    "mu_target": "rdm.mu_target",
    "sigma_target": "rdm.sigma_target",
    "num_projections": "rdm.num_projections",
    "seed": "seed",
    "update_mode": None,  # only "b_only" (the method) is supported
    "variant_note": None,  # free text written by the later release's ablation generator
}
# What the original's code uses when a training key is absent (None: it requires the key).
# These are NOT the paper's values (every paper config sets all of them explicitly).
_ORIGINAL_CODE_DEFAULTS: dict[str, Any] = {
    "embed_dim": 1024,
    "num_heads": 8,
    "max_position_embeddings": 4096,
    "mu_gate": -0.5,
    "lambda_reg": 0.1,
    "mu_target": -1.0,
    "sigma_target": 1.0,
    "num_projections": 1024,
    "alpha_init": 0.1,
    "gradient_accumulation_steps": 8,
    "lr": None,
    "num_epochs": None,
}
# Our fields that the original layout sets elsewhere (not accepted inside `training`).
_SET_ELSEWHERE = {
    "experiment_name": "experiment_name", "task_name": "tasks[i].task_name",
    "output_dir": "output_dir", "target.model_path": "base_model_path",
    "target.adapter_path": "initial_target_lora", "target.template": "data_global.template",
    "target.from_task": "(set by chaining)", "sources": "tasks[i].source_lora_paths",
    "data.data_root": "data_global.dataset_dir", "data.datasets": "tasks[i].datasets",
    "fusion.reuse_from": "(set by chaining; use a distinct fusion_group_name for a fresh net)",
}
# Sections that may be written as nested mappings inside `training` (train: {lr: ...}).
_TRAINING_SECTIONS = ("data", "fusion", "rdm", "train", "mesh")


def _training_names() -> dict[str, str]:
    """Every name accepted in a YAML `training` block -> our dotted field."""
    names: dict[str, str] = {}
    for path, _ in _leaf_paths(_schema()):
        if path in _SET_ELSEWHERE:
            continue
        names[path] = path
        section, _, leaf = path.rpartition(".")
        if section in ("data", "fusion", "rdm", "train"):
            names[leaf] = path  # bare names; unique across these sections
    names.update({k: v for k, v in _ORIGINAL_TRAINING_FIELDS.items() if v is not None})
    return names


class _Fields:
    """Collects field assignments for one task, refusing contradictory duplicates."""

    def __init__(self, file: str):
        self.file = file
        self.values: dict[str, tuple[Any, str]] = {}

    def put(self, path: str, value: Any, where: str) -> None:
        if path in self.values and self.values[path][0] != value:
            old, old_where = self.values[path]
            raise ConfigError(
                f"{self.file}: '{path}' is set twice with different values: "
                f"{old_where}={old!r} and {where}={value!r}"
            )
        self.values[path] = (value, where)

    def copy(self) -> _Fields:
        other = _Fields(self.file)
        other.values = dict(self.values)
        return other


def _check_keys(mapping: Any, allowed: Sequence[str], file: str, where: str) -> Mapping:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{file}: '{where}' must be a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            field = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{file}: unknown field '{field}'{_suggest(str(key), allowed)}")
    return mapping


def _coerce_numeric_string(value: Any, field_type: type) -> Any:
    """YAML reads ``5e-5`` (no dot) as a string; the original float()s it, so do we."""
    if isinstance(value, str) and field_type in (int, float):
        try:
            number = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            return number
    return value


def _task_datasets(entries: Any, file: str, where: str) -> tuple[str, ...]:
    """The task's dataset names, mains first then replays (the original's concat order)."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: '{where}' must be a non-empty list")
    mains: list[str] = []
    replays: list[str] = []
    for j, entry in enumerate(entries):
        at = f"{where}[{j}]"
        _check_keys(entry, _DATASET_FIELDS, file, at)
        if "name" not in entry:
            raise ConfigError(f"{file}: '{at}' has no name")
        kind = entry.get("type", "replay")
        if kind == "main":
            mains.append(str(entry["name"]))
            continue
        if kind != "replay":
            raise ConfigError(f"{file}: '{at}.type'={kind!r}: expected 'main' or 'replay'")
        ratio = entry.get("ratio")
        if not (isinstance(ratio, str) and ratio.lower() == "all"):
            shown = " missing (the original's default is 0.1)" if ratio is None else f"={ratio!r}"
            raise ConfigError(
                f"{file}: '{at}.ratio'{shown}: hfjax pools whole replay sets only; "
                "write 'ratio: all' (as every paper config does)"
            )
        replays.append(str(entry["name"]))
    if not mains:
        raise ConfigError(
            f"{file}: '{where}' has no 'type: main' dataset (the original requires one)")
    return tuple(mains + replays)


def _training_fields(block: Any, fields: _Fields, file: str, where: str) -> None:
    """Translates one task's `training` block into ``fields``."""
    names = _training_names()
    if block is None:
        return
    if not isinstance(block, Mapping):
        raise ConfigError(f"{file}: '{where}' must be a mapping")
    flat: list[tuple[str, Any]] = []
    for key, value in block.items():
        key = str(key)
        if key in _TRAINING_SECTIONS and isinstance(value, Mapping):
            flat.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            flat.append((key, value))
    for key, value in flat:
        at = f"{where}.{key}"
        if key == "update_mode":
            if value != "b_only":
                raise ConfigError(
                    f"{file}: '{at}'={value!r} is not supported (only 'b_only': the target "
                    "A is kept and B is updated, SPEC §5)"
                )
            continue
        if key == "variant_note":
            continue
        if key in _SET_ELSEWHERE:
            raise ConfigError(f"{file}: '{at}': set it with {_SET_ELSEWHERE[key]} instead")
        if key not in names:
            raise ConfigError(f"{file}: unknown field '{at}'{_suggest(key, list(names))}")
        fields.put(names[key], value, at)


def _load_original_yaml(file: str) -> list[ConfigDict]:
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}: not valid YAML{at}: {what}") from e
    data = _expand_strings(data, file)
    _check_keys(data, _TOP_FIELDS, file, "")
    for required in ("output_dir", "base_model_path", "initial_target_lora", "tasks"):
        if required not in data:
            raise ConfigError(f"{file}: missing field '{required}'")
    tasks = data["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{file}: 'tasks' must be a non-empty list")

    common = _Fields(file)
    common.put("experiment_name", str(data.get("experiment_name", "")), "experiment_name")
    common.put("output_dir", data["output_dir"], "output_dir")
    common.put("target.model_path", data["base_model_path"], "base_model_path")
    if "seed" in data:
        common.put("seed", data["seed"], "seed")
    data_global = _check_keys(data.get("data_global") or {}, list(_DATA_GLOBAL_FIELDS), file,
                              "data_global")
    for key, value in data_global.items():
        if _DATA_GLOBAL_FIELDS[key] is not None:
            common.put(_DATA_GLOBAL_FIELDS[key], value, f"data_global.{key}")
    if "dataset_dir" not in data_global:
        common.put("data.data_root", "data", "data_global.dataset_dir (the original's default)")

    configs: list[ConfigDict] = []
    group_owner: dict[str, str] = {}  # fusion group name -> latest task that trained it
    for i, task in enumerate(tasks):
        where = f"tasks[{i}]"
        _check_keys(task, _TASK_FIELDS, file, where)
        fields = common.copy()
        name = str(task.get("task_name", f"Task_{i}"))
        fields.put("task_name", name, f"{where}.task_name")
        if i == 0:
            fields.put("target.adapter_path", data["initial_target_lora"], "initial_target_lora")
        else:
            fields.put("target.from_task", configs[-1].task_name, "(chained)")

        paths = task.get("source_lora_paths")
        single = task.get("source_lora_path")
        if paths and single:
            raise ConfigError(f"{file}: '{where}' sets both source_lora_paths and source_lora_path")
        if single:
            paths = [single]
        if not paths or not isinstance(paths, list):
            raise ConfigError(f"{file}: '{where}.source_lora_paths' must be a non-empty list")
        fields.put("sources", _make_sources([(None, str(p)) for p in paths]), f"{where}.sources")

        if "transfer_ratio" in task:
            fields.put("fusion.transfer_ratio", task["transfer_ratio"], f"{where}.transfer_ratio")
        alignment = task.get("layer_alignment", "tail")
        if alignment != "tail":
            raise ConfigError(
                f"{file}: '{where}.layer_alignment'={alignment!r} is not supported "
                "(only 'tail', the method: SPEC §2)"
            )
        if "seed" in task:
            fields.put("seed", task["seed"], f"{where}.seed")
        if "datasets" not in task:
            raise ConfigError(f"{file}: '{where}' has no datasets")
        fields.put("data.datasets", _task_datasets(task["datasets"], file, f"{where}.datasets"),
                   f"{where}.datasets")
        _training_fields(task.get("training"), fields, file, f"{where}.training")
        for key, default in _ORIGINAL_CODE_DEFAULTS.items():
            ours = _ORIGINAL_TRAINING_FIELDS[key]
            if ours in fields.values:
                continue
            if default is None:
                raise ConfigError(
                    f"{file}: missing field '{where}.training.{key}' (the original requires it)")
            fields.put(ours, default, f"{where}.training.{key} (the original's default)")
        for ours, original in (("target.template", "data_global.template"),
                               ("train.batch_size", "data_global.batch_size")):
            if ours not in fields.values:
                raise ConfigError(f"{file}: missing field '{original}' (the original requires it)")

        cfg = _schema()
        for field, (value, at) in fields.values.items():
            parent, _, leaf = field.rpartition(".")
            node = _get(cfg, parent) if parent else cfg
            value = _coerce_numeric_string(value, node.get_type(leaf))
            _assign(node, leaf, value, label=f"{file}: {at}")
        cfg.fusion.reuse_from = group_owner.get(cfg.fusion.group_name, "")
        group_owner[cfg.fusion.group_name] = cfg.task_name
        configs.append(cfg)
    return configs


# --------------------------------------------------------------------------- chaining


def _chain_problems(configs: Sequence[ConfigDict]) -> list[str]:
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
    problems = _chain_problems(configs)
    if problems:
        raise ConfigError(f"{file}: {problems[0]}", [f"{file}: {p}" for p in problems])
    by_name = {cfg.task_name: cfg for cfg in configs}
    for cfg in configs:
        if cfg.target.from_task:
            cfg.target.adapter_path = export_dir(by_name[cfg.target.from_task])


# --------------------------------------------------------------------------- load


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> list[ConfigDict]:
    """Loads a config file into one locked ConfigDict per task, in order.

    ``path`` is a ``.py`` file (``get_config()``, or ``get_config(ARG)`` with ``FILE.py:ARG``)
    or a ``.yaml``/``.yml`` file in the original release's layout (see the module docstring).
    ``overrides`` (``"train.lr=1e-4"``, environment variables expanded) apply to every task,
    before chained tasks' target adapters are pointed at the earlier exports.
    Raises ``ConfigError`` for unknown fields, bad types, unset variables and broken chains;
    call ``validate_configs`` for value and path checks.
    """
    spec = os.fspath(path)
    file, arg = _split_spec(spec)
    suffix = Path(file).suffix.lower()
    if suffix == ".py":
        configs = _load_py(file, arg)
    elif suffix in (".yaml", ".yml"):
        configs = _load_original_yaml(file)
    else:
        raise ConfigError(f"{spec}: expected a .py, .yaml or .yml config file")
    overrides = [expand_env(item, where=f"{spec}: override {item!r}") for item in overrides]
    for cfg in configs:
        apply_overrides(cfg, overrides, where=f"{spec}: override")
        _expand_user(cfg)
    _link_tasks(configs, spec)
    for cfg in configs:
        cfg.lock()
        for source in cfg.sources:
            source.lock()
    return configs


# --------------------------------------------------------------------------- validation


def _adapter_problem(path: str) -> str | None:
    if not os.path.isdir(path):
        return "no such directory"
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return "has no adapter_config.json"
    if not any(os.path.isfile(os.path.join(path, f))
               for f in ("adapter_model.safetensors", "adapter_model.bin")):
        return "has no adapter_model.safetensors or adapter_model.bin"
    return None


def _dataset_found(root: str, name: str) -> bool:
    if any(os.path.isfile(os.path.join(root, name + ext)) for ext in (".json", ".jsonl")):
        return True
    info = os.path.join(root, "dataset_info.json")
    if os.path.isfile(info):
        try:
            with open(info) as f:
                return name in json.load(f)
        except (OSError, ValueError):
            return False
    return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


is_number = _number


def check_train_fields(train: ConfigDict, bad: Any, positive: Any) -> None:
    """Checks shared by the ``train`` sections of the fuse and train-lora configs.

    ``bad(field, value, why)`` records a problem; ``positive(field)`` checks a positive int.
    """
    if not (_number(train.weight_decay) and train.weight_decay >= 0):
        bad("train.weight_decay", train.weight_decay, "must be a non-negative number")
    for field in ("batch_size", "grad_accum", "log_every", "checkpoint_every",
                  "keep_checkpoints"):
        positive(f"train.{field}")
    steps = train.max_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == -1 or steps > 0):
        bad("train.max_steps", steps, "must be -1 (all epochs) or positive")


def validate_config(cfg: ConfigDict, *, check_paths: bool = True) -> None:
    """Checks one task's values (and, with ``check_paths``, that its inputs exist).

    Raises ``ConfigError`` listing every problem, one line each, naming the field and value.
    A chained task's target adapter (``target.from_task`` set) is produced by an earlier task,
    so its existence is not checked.
    """
    problems: list[str] = []

    def bad(field: str, value: Any, why: str) -> None:
        problems.append(f"{field}={value!r}: {why}")

    def positive(field: str, *, integer: bool = True) -> None:
        value = _get(cfg, field)
        ok = isinstance(value, int) if integer else _number(value)
        if not ok or isinstance(value, bool) or value <= 0:
            bad(field, value, "must be a positive " + ("integer" if integer else "number"))

    def choice(field: str, options: Sequence[str]) -> None:
        if _get(cfg, field) not in options:
            bad(field, _get(cfg, field), f"must be one of {', '.join(options)}")

    def nonempty(field: str) -> bool:
        value = _get(cfg, field)
        if not isinstance(value, str) or not value:
            bad(field, value, "must be set")
            return False
        return True

    # Identity and outputs.
    if nonempty("task_name") and any(c in cfg.task_name for c in "/\\"):
        bad("task_name", cfg.task_name, "must not contain path separators")
    nonempty("output_dir")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        bad("seed", cfg.seed, "must be a non-negative integer")

    # Target.
    if nonempty("target.model_path") and check_paths and not os.path.exists(cfg.target.model_path):
        bad("target.model_path", cfg.target.model_path, "no such file or directory")
    if nonempty("target.adapter_path") and check_paths and not cfg.target.from_task:
        why = _adapter_problem(cfg.target.adapter_path)
        if why:
            bad("target.adapter_path", cfg.target.adapter_path, why)
    choice("target.template", TEMPLATES)

    # Sources.
    if not cfg.sources:
        bad("sources", cfg.sources, "at least one source adapter is needed")
    names: set[str] = set()
    for i, source in enumerate(cfg.sources):
        if not isinstance(source, (ConfigDict, Mapping)) or set(source.keys()) != {
                "name", "adapter_path"}:
            bad(f"sources.{i}", source, "must be {name, adapter_path}")
            continue
        if not source["name"]:
            bad(f"sources.{i}.name", source["name"], "must be set")
        elif source["name"] in names:
            bad(f"sources.{i}.name", source["name"], "two sources share this name")
        names.add(source["name"])
        if not source["adapter_path"]:
            bad(f"sources.{i}.adapter_path", source["adapter_path"], "must be set")
        elif check_paths:
            why = _adapter_problem(source["adapter_path"])
            if why:
                bad(f"sources.{i}.adapter_path", source["adapter_path"], why)

    # Data.
    if nonempty("data.data_root") and check_paths and not os.path.isdir(cfg.data.data_root):
        bad("data.data_root", cfg.data.data_root, "no such directory")
    if not cfg.data.datasets:
        bad("data.datasets", cfg.data.datasets, "at least one dataset is needed")
    for i, name in enumerate(cfg.data.datasets):
        if not isinstance(name, str) or not name:
            bad(f"data.datasets.{i}", name, "must be a dataset name")
        elif name in cfg.data.datasets[:i]:
            bad(f"data.datasets.{i}", name, "listed twice")
        elif check_paths and os.path.isdir(cfg.data.data_root) and not _dataset_found(
                cfg.data.data_root, name):
            bad(f"data.datasets.{i}", name,
                f"no {name}.json or {name}.jsonl (or dataset_info.json entry) in data.data_root")
    positive("data.cutoff_len")
    positive("data.min_bucket")
    if (isinstance(cfg.data.min_bucket, int) and isinstance(cfg.data.cutoff_len, int)
            and cfg.data.min_bucket > cfg.data.cutoff_len):
        bad("data.min_bucket", cfg.data.min_bucket, "must not exceed data.cutoff_len")

    # Transfer network.
    for field in ("fusion.block_size", "fusion.embed_dim", "fusion.num_heads", "fusion.max_pos"):
        positive(field)
    embed, heads = cfg.fusion.embed_dim, cfg.fusion.num_heads
    if isinstance(embed, int) and isinstance(heads, int) and heads > 0 and embed % heads:
        bad("fusion.num_heads", heads, f"must divide fusion.embed_dim={embed}")
    if isinstance(embed, int) and 0 < embed < 4:
        bad("fusion.embed_dim", embed, "must be at least 4 (the gate MLP is E//4 wide)")
    for field in ("fusion.mu_gate", "fusion.alpha_init"):
        if not _number(_get(cfg, field)):
            bad(field, _get(cfg, field), "must be a finite number")
    try:
        ratio = parse_transfer_ratio(cfg.fusion.transfer_ratio)
        if not (0.0 < ratio <= 1.0):
            bad("fusion.transfer_ratio", cfg.fusion.transfer_ratio, "must lie in (0, 1]")
    except ConfigError:
        bad("fusion.transfer_ratio", cfg.fusion.transfer_ratio, "expected a number or 'a/b'")
    choice("fusion.gate", GATES)
    choice("fusion.layer_alignment", LAYER_ALIGNMENTS)
    choice("fusion.update_mode", UPDATE_MODES)
    nonempty("fusion.group_name")

    # RDM.
    if not _number(cfg.rdm.lambda_reg) or cfg.rdm.lambda_reg < 0:
        bad("rdm.lambda_reg", cfg.rdm.lambda_reg, "must be a non-negative number")
    if not _number(cfg.rdm.mu_target):
        bad("rdm.mu_target", cfg.rdm.mu_target, "must be a finite number")
    positive("rdm.sigma_target", integer=False)
    positive("rdm.num_projections")
    choice("rdm.activation", ACTIVATIONS)
    choice("rdm.sort", RDM_SORTS)

    # Optimisation.
    positive("train.epochs")
    positive("train.lr", integer=False)
    positive("train.eps", integer=False)
    value = cfg.train.warmup_ratio
    if not (_number(value) and 0 <= value <= 1):
        bad("train.warmup_ratio", value, "must lie in [0, 1]")
    for field in ("train.b1", "train.b2"):
        value = _get(cfg, field)
        if not (_number(value) and 0 <= value < 1):
            bad(field, value, "must lie in [0, 1)")
    check_train_fields(cfg.train, bad, positive)
    choice("train.base_dtype", BASE_DTYPES)

    # Mesh.
    sizes = {axis: cfg.mesh[axis] for axis in MESH_AXES}
    for axis, size in sizes.items():
        if not (isinstance(size, int) and (size == -1 or size > 0)):
            bad(f"mesh.{axis}", size, "must be -1 (the rest) or positive")
    if list(sizes.values()).count(-1) > 1:
        bad("mesh", sizes, "at most one axis may be -1")
    logical_seen: set[str] = set()
    for i, rule in enumerate(cfg.mesh.rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            bad(f"mesh.rules.{i}", rule, "must be (logical_axis, mesh_axes)")
            continue
        logical, target = rule
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        if any(a not in MESH_AXES for a in axes):
            bad(f"mesh.rules.{i}", rule, f"mesh axes must be among {', '.join(MESH_AXES)}")
        if logical in logical_seen:
            bad(f"mesh.rules.{i}", rule, f"logical axis {logical!r} appears twice")
        if logical == "lora_r" and axes:
            bad(f"mesh.rules.{i}", rule, "lora_r must never be sharded")
        logical_seen.add(logical)

    if problems:
        raise ConfigError("\n".join(problems), problems)


def validate_configs(configs: Sequence[ConfigDict], *, check_paths: bool = True) -> None:
    """``validate_config`` for every task of a file, plus the links between them."""
    problems: list[str] = []
    for cfg in configs:
        try:
            validate_config(cfg, check_paths=check_paths)
        except ConfigError as e:
            label = f"task {cfg.task_name!r}: " if len(configs) > 1 else ""
            problems.extend(label + p for p in e.problems)
    problems.extend(_chain_problems(configs))
    if problems:
        raise ConfigError("\n".join(problems), problems)
