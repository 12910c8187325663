"""Translators from other releases' YAML layouts into the fuse schema (``configs/fuse.py``).

Each layout is one function ``load_<layout>(file) -> list[ConfigDict]`` (one per task, in
order, not yet overridden, linked or locked); ``LAYOUTS`` lists them and `detect_layout`
picks the one a parsed file is written in. Today there is one:

**The original release's layout** (ECNU-ICALK/HeteroFusion ``main.py``; one file = one
pipeline)::

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
      layer_alignment: tail                      # (later release)        -> fusion.layer_alignment
      seed: 42                                   # (later release)        -> seed
      datasets:                      # mains first, then replays -> data.datasets, data.roles
      - {name: TweetNER7_sample_15000_sample300, type: main}                -> "main"
      - {name: mit-movie_sample300, type: replay, ratio: all}               -> "replay:all"
      - {name: conll04_sample300, ratio: 0.5}    # type defaults to replay  -> "replay:0.5"
      # (ratio defaults to 0.1, the original's; type: replay with a number samples
      #  int(ratio x all main records), seeded from seed)
      training:
        fusion_group_name: heterofusion_transfer                          -> fusion.group_name
        embed_dim: 1024 / num_heads: 8 / mu_gate: 0.1 / alpha_init: 0.3   -> fusion.*
        max_position_embeddings: 4096                                     -> fusion.max_pos
        block_size: 4096                         # (later release)        -> fusion.block_size
        num_epochs: 3 / lr: 5.0e-05                                       -> train.epochs / train.lr
        gradient_accumulation_steps: 8                                    -> train.grad_accum
        lambda_reg / mu_target / sigma_target / num_projections           -> rdm.*
        update_mode: b_only                      # (later release)        -> fusion.update_mode
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

Chaining (``target.from_task``, ``fusion.reuse_from``) is recorded here as the original does
it: task i > 0 starts from task i-1's export, and reuses the networks of the latest earlier
task with the same ``fusion_group_name``; `hfjax.config.files` then checks and links it.

The later release's files (``configs/heterofusion/custom/``) use this same layout, their
``type`` / ``ratio`` dataset entries included (mapped to ``data.roles``). A layout of its own
would go in a second ``load_*`` function next to `load_original_yaml`, with its own entry in
``LAYOUTS`` and a rule in `detect_layout`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hfjax.config.overrides import expand_strings
from hfjax.config.problems import ConfigError, suggest
from hfjax.config.sources import sources_config
from hfjax.config.tree import ConfigDict, assign, get_field, leaf_paths
from hfjax.configs import fuse as _fuse_schema

__all__ = ["LAYOUTS", "detect_layout", "load_original_yaml", "load_yaml"]

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
    "update_mode": "fusion.update_mode",  # (later release) b_only | a_only | ab_joint
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
    "data.roles": "tasks[i].datasets (type, ratio)",
    "fusion.reuse_from": "(set by chaining; use a distinct fusion_group_name for a fresh net)",
}
# Sections that may be written as nested mappings inside `training` (train: {lr: ...}).
_TRAINING_SECTIONS = ("data", "fusion", "rdm", "train", "mesh")


def _training_names() -> dict[str, str]:
    """Every name accepted in a YAML `training` block -> our dotted field."""
    names: dict[str, str] = {}
    for path, _ in leaf_paths(_fuse_schema.get_config()):
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
            raise ConfigError(f"{file}: unknown field '{field}'{suggest(str(key), allowed)}")
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


def _task_datasets(entries: Any, file: str, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The task's dataset names and roles (``data.datasets``, ``data.roles``), mains first
    then replays (the original's concat order).

    ``type`` defaults to replay and a replay's ``ratio`` to 0.1, as in the original; a main's
    ratio is ignored, as there. The rules (known types, ratio > 0, one main) are
    `DataSpec.check`'s, so a bad value is refused when the task is checked.
    """
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{file}: '{where}' must be a non-empty list")
    mains: list[tuple[str, str]] = []
    replays: list[tuple[str, str]] = []
    for j, entry in enumerate(entries):
        at = f"{where}[{j}]"
        _check_keys(entry, _DATASET_FIELDS, file, at)
        if "name" not in entry:
            raise ConfigError(f"{file}: '{at}' has no name")
        kind = str(entry.get("type", "replay"))
        if kind == "main":
            mains.append((str(entry["name"]), "main"))
            continue
        ratio = entry.get("ratio", 0.1)
        replays.append((str(entry["name"]), f"{kind}:{ratio}"))
    pairs = mains + replays
    return tuple(n for n, _ in pairs), tuple(r for _, r in pairs)


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
        if key == "variant_note":
            continue
        if key in _SET_ELSEWHERE:
            raise ConfigError(f"{file}: '{at}': set it with {_SET_ELSEWHERE[key]} instead")
        if key not in names:
            raise ConfigError(f"{file}: unknown field '{at}'{suggest(key, list(names))}")
        fields.put(names[key], value, at)


def _read_yaml(file: str) -> Any:
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: no such config file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{file}: not valid YAML{at}: {what}") from e


def load_original_yaml(file: str, data: Any = None) -> list[ConfigDict]:
    """The tasks of ``file`` (already parsed as ``data``, or read here), original layout."""
    if data is None:
        data = _read_yaml(file)
    data = expand_strings(data, file)
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
        fields.put("sources", sources_config([str(p) for p in paths]), f"{where}.sources")

        if "transfer_ratio" in task:
            fields.put("fusion.transfer_ratio", task["transfer_ratio"], f"{where}.transfer_ratio")
        if "layer_alignment" in task:
            fields.put("fusion.layer_alignment", task["layer_alignment"],
                       f"{where}.layer_alignment")
        if "seed" in task:
            fields.put("seed", task["seed"], f"{where}.seed")
        if "datasets" not in task:
            raise ConfigError(f"{file}: '{where}' has no datasets")
        names, roles = _task_datasets(task["datasets"], file, f"{where}.datasets")
        fields.put("data.datasets", names, f"{where}.datasets")
        fields.put("data.roles", roles, f"{where}.datasets")
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

        cfg = _fuse_schema.get_config()
        for field, (value, at) in fields.values.items():
            parent, _, leaf = field.rpartition(".")
            node = get_field(cfg, parent)
            value = _coerce_numeric_string(value, node.get_type(leaf))
            assign(node, leaf, value, label=f"{file}: {at}")
        cfg.fusion.reuse_from = group_owner.get(cfg.fusion.group_name, "")
        group_owner[cfg.fusion.group_name] = cfg.task_name
        configs.append(cfg)
    return configs


# Layout name -> translator. The later release's layout gets its own entry here.
LAYOUTS: dict[str, Callable[[str, Any], list[ConfigDict]]] = {
    "original": load_original_yaml,
}


def detect_layout(data: Any) -> str:
    """The layout a parsed YAML file is written in (today always ``"original"``)."""
    return "original"


def load_yaml(file: str) -> list[ConfigDict]:
    """The tasks of a ``.yaml`` / ``.yml`` file, in whichever layout it is written."""
    data = _read_yaml(file)
    return LAYOUTS[detect_layout(data)](file, data)
