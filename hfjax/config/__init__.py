"""Configs in, typed jobs out: the one boundary between config files and the library.

- `files`: ``load_config`` (fuse, one ConfigDict per task) and ``load_train_config``
  (train-lora): ``.py`` files with ``:ARG``, multi-task chaining, ``${VAR}``, ``~``.
- `yaml_layouts`: other releases' YAML layouts translated into the fuse schema.
- `overrides`: ``--config.x=y`` overrides and environment expansion.
- `sources`: the one reader of ``sources`` and the naming rule for unnamed sources.
- `components`: the frozen, typed pieces of a job, each with the one copy of its rules.
- `jobs`: ``to_fuse_job`` / ``to_lora_job``: a ConfigDict checked into a `FuseJob` /
  `LoraJob` (every problem in one `ConfigError`).
"""

from hfjax.config.components import (
    DataSpec,
    LoraSpec,
    MeshConfig,
    OptimizerConfig,
    PlanConfig,
    RDMConfig,
    SourceSpec,
    TargetSpec,
    TrainConfig,
    TransferNetConfig,
    parse_transfer_ratio,
    resolve_template,
)
from hfjax.config.files import export_dir, is_finished, load_config, load_train_config
from hfjax.config.jobs import (
    FuseJob,
    LoraJob,
    as_fuse_job,
    as_lora_job,
    to_fuse_job,
    to_lora_job,
    validate_config,
    validate_configs,
    validate_train_config,
)
from hfjax.config.overrides import apply_overrides, expand_env
from hfjax.config.problems import ConfigError
from hfjax.config.sources import parse_sources
from hfjax.config.tree import config_to_dict

__all__ = [
    "ConfigError",
    "DataSpec",
    "FuseJob",
    "LoraJob",
    "LoraSpec",
    "MeshConfig",
    "OptimizerConfig",
    "PlanConfig",
    "RDMConfig",
    "SourceSpec",
    "TargetSpec",
    "TrainConfig",
    "TransferNetConfig",
    "apply_overrides",
    "as_fuse_job",
    "as_lora_job",
    "config_to_dict",
    "expand_env",
    "export_dir",
    "is_finished",
    "load_config",
    "load_train_config",
    "parse_sources",
    "parse_transfer_ratio",
    "resolve_template",
    "to_fuse_job",
    "to_lora_job",
    "validate_config",
    "validate_configs",
    "validate_train_config",
]
