"""The config boundary: a ConfigDict in, a checked, frozen, typed job out.

Below this boundary the library takes jobs and their components, never a ConfigDict::

    job = to_fuse_job(cfg)            # FuseJob, or ConfigError listing every problem
    job.net.embed_dim, job.plan.ratio, job.optim.build(steps), job.sources[0].name

    FuseJob(task_name, output_dir, seed, experiment_name,
            target: TargetSpec, sources: tuple[SourceSpec, ...], data: DataSpec,
            plan: PlanConfig, net: TransferNetConfig, rdm: RDMConfig,
            optim: OptimizerConfig, train: TrainConfig, mesh: MeshConfig,
            group_name, reuse_from, zero_sources)
    LoraJob(task_name, output_dir, seed, model_path, template,
            data: DataSpec, lora: LoraSpec, optim: OptimizerConfig, train: TrainConfig)

Every rule lives in the component it is about (`hfjax.config.components`); the conversion
only gathers their problems, in config order, into one `ConfigError` whose lines read
``field=value: why`` (the field as written in the config file).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

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
    run_problems,
    source_control_problems,
    sources_problems,
    template_problems,
)
from hfjax.config.files import chain_problems
from hfjax.config.problems import ConfigError, problem, raise_problems
from hfjax.config.sources import source_items
from hfjax.config.tree import ConfigDict
from hfjax.training.fused_export import EXPORT_DTYPES

__all__ = [
    "FuseJob",
    "LoraJob",
    "as_fuse_job",
    "as_lora_job",
    "fuse_job_from",
    "lora_job_from",
    "to_fuse_job",
    "to_lora_job",
    "validate_config",
    "validate_configs",
    "validate_train_config",
]


@dataclasses.dataclass(frozen=True)
class FuseJob:
    """One checked HeteroFusion task (schema: ``configs/fuse.py``)."""

    task_name: str  # the export goes to <output_dir>/<task_name>/merged_lora/
    output_dir: str  # run root
    seed: int  # the one seed
    experiment_name: str  # a free label
    target: TargetSpec  # ``target.*``
    sources: tuple[SourceSpec, ...]  # ``sources``, names filled in
    data: DataSpec  # ``data.*``
    plan: PlanConfig  # ``fusion.block_size``, ``fusion.transfer_ratio``
    net: TransferNetConfig  # ``fusion.embed_dim/num_heads/max_pos/mu_gate/gate/alpha_init``
    rdm: RDMConfig  # ``rdm.*``
    optim: OptimizerConfig  # ``train.lr/warmup_ratio/weight_decay/b1/b2/eps``
    train: TrainConfig  # the rest of ``train.*``
    mesh: MeshConfig  # ``mesh.*``
    group_name: str  # ``fusion.group_name``: networks are shared by tasks of one group
    reuse_from: str = ""  # ``fusion.reuse_from``: earlier task whose networks start this one
    zero_sources: bool = False  # ``fusion.zero_sources``: the zero-source ablation
    export_dtype: str = "float32"  # ``fusion.export_dtype``: dtype of the fused factors
    source_control: str = "none"  # ``fusion.source_control``: none | zero | noise | mismatch

    @property
    def control(self) -> str:
        """The source control this run applies (``zero_sources`` is an alias of "zero")."""
        return "zero" if self.zero_sources else self.source_control

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<task_name>``: everything this task writes."""
        return os.path.join(self.output_dir, self.task_name)

    def problems(self, *, check_paths: bool = True) -> list[str]:
        """Every problem of every component, one line each, in config order."""
        out = run_problems(self.task_name, self.output_dir, self.seed)
        out += self.target.check(check_paths=check_paths)
        out += sources_problems(self.sources, check_paths=check_paths)
        out += self.data.check(check_paths=check_paths)
        out += self.plan.check()
        out += self.net.check()
        out += source_control_problems(self.source_control, self.zero_sources)
        if self.export_dtype not in EXPORT_DTYPES:
            out.append(problem("fusion.export_dtype", self.export_dtype,
                               f"must be one of {', '.join(EXPORT_DTYPES)}"))
        if not isinstance(self.group_name, str) or not self.group_name:
            out.append(problem("fusion.group_name", self.group_name, "must be set"))
        out += self.rdm.check()
        out += self.optim.check()
        out += self.train.check()
        out += self.mesh.check()
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts/lists/scalars (for reports)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LoraJob:
    """One checked train-lora job (schema: ``configs/train_lora.py``)."""

    task_name: str  # everything goes below <output_dir>/<task_name>/
    output_dir: str  # run root
    seed: int  # the one seed (A init, data order)
    model_path: str  # base model folder (HF layout)
    template: str  # chat template name, or "auto"
    data: DataSpec  # ``data_root``, ``datasets``, ``cutoff_len``, ``min_bucket``
    lora: LoraSpec  # ``lora.*``
    optim: OptimizerConfig  # ``train.lr/warmup_ratio/weight_decay``
    train: TrainConfig  # the rest of ``train.*``
    init_adapter: str = ""  # PEFT adapter to continue training from ("" = fresh LoRA)

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<task_name>``: everything this job writes."""
        return os.path.join(self.output_dir, self.task_name)

    def problems(self, *, check_paths: bool = True) -> list[str]:
        """Every problem of every component, one line each."""
        out: list[str] = []
        if not isinstance(self.model_path, str) or not self.model_path:
            out.append(problem("model_path", self.model_path, "must be set"))
        elif check_paths and not os.path.isfile(os.path.join(self.model_path, "config.json")):
            why = "no such directory" if not os.path.isdir(self.model_path) else \
                "has no config.json"
            out.append(problem("model_path", self.model_path, why))
        out += run_problems(self.task_name, self.output_dir, self.seed)
        out += template_problems(self.template, "template")
        # Datasets are looked up by the loader, whose DataError names the data root.
        out += self.data.check(check_paths=check_paths, find_datasets=False, at="")
        if self.init_adapter and check_paths and not os.path.isdir(self.init_adapter):
            out.append(problem("init_adapter", self.init_adapter, "no such adapter directory"))
        out += self.lora.check()
        out += self.optim.check()
        out += self.train.check()
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts/lists/scalars (for reports)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- conversion


def _float(value: Any) -> Any:
    """Ints as floats (so equal settings hash equal); anything else as it is, for `check`."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _sources(value: Any) -> tuple[tuple[SourceSpec, ...], list[str]]:
    """``sources`` in any written form -> specs (names by the one rule), plus problems."""
    try:
        return tuple(SourceSpec(**d) for d in source_items(value)), []
    except ConfigError as e:
        return (), [str(e)]


def _optim(tr: Any, **defaults: Any) -> OptimizerConfig:
    def get(key: str) -> Any:
        return tr[key] if key in tr else defaults[key]

    return OptimizerConfig(lr=_float(get("lr")), warmup_ratio=_float(get("warmup_ratio")),
                           weight_decay=_float(get("weight_decay")), b1=_float(get("b1")),
                           b2=_float(get("b2")), eps=_float(get("eps")))


def _train(tr: Any) -> TrainConfig:
    return TrainConfig(epochs=tr.epochs, batch_size=tr.batch_size, grad_accum=tr.grad_accum,
                       max_steps=tr.max_steps, log_every=tr.log_every,
                       checkpoint_every=tr.checkpoint_every,
                       keep_checkpoints=tr.keep_checkpoints, remat=tr.remat,
                       base_dtype=tr.base_dtype, windows=tr.get("windows", "original"),
                       scan_layers=bool(tr.get("scan_layers", True)))


def _data(root: Any, datasets: Any, cutoff_len: Any, min_bucket: Any,
          roles: Any = ()) -> DataSpec:
    return DataSpec(data_root=root, datasets=tuple(datasets), cutoff_len=cutoff_len,
                    min_bucket=min_bucket, roles=tuple(roles))


def fuse_job_from(cfg: ConfigDict) -> tuple[FuseJob, list[str]]:
    """A ConfigDict as a `FuseJob`, unchecked, and the problems found reading ``sources``."""
    f, r, m = cfg.fusion, cfg.rdm, cfg.mesh
    sources, problems = _sources(cfg.sources)
    job = FuseJob(
        task_name=cfg.task_name, output_dir=cfg.output_dir, seed=cfg.seed,
        experiment_name=cfg.experiment_name,
        target=TargetSpec(model_path=cfg.target.model_path,
                          adapter_path=cfg.target.adapter_path, template=cfg.target.template,
                          from_task=cfg.target.from_task),
        sources=sources,
        data=_data(cfg.data.data_root, cfg.data.datasets, cfg.data.cutoff_len,
                   cfg.data.min_bucket, cfg.data.get("roles", ())),
        plan=PlanConfig(block_size=f.block_size, transfer_ratio=f.transfer_ratio,
                        layer_alignment=f.get("layer_alignment", "tail"),
                        update_mode=f.get("update_mode", "b_only")),
        net=TransferNetConfig(embed_dim=f.embed_dim, num_heads=f.num_heads, max_pos=f.max_pos,
                              mu_gate=_float(f.mu_gate), gate=f.gate,
                              alpha_init=_float(f.alpha_init)),
        rdm=RDMConfig(lambda_reg=_float(r.lambda_reg), mu_target=_float(r.mu_target),
                      sigma_target=_float(r.sigma_target), num_projections=r.num_projections,
                      activation=r.activation, sort=r.sort),
        optim=_optim(cfg.train), train=_train(cfg.train),
        mesh=MeshConfig(data=m.data, fsdp=m.fsdp, tensor=m.tensor,
                        rules=tuple(tuple(x) if isinstance(x, list) else x for x in m.rules)),
        group_name=f.group_name, reuse_from=f.reuse_from, zero_sources=bool(f.zero_sources),
        export_dtype=f.get("export_dtype", "float32"),
        source_control=f.get("source_control", "none"),
    )
    return job, problems


def to_fuse_job(cfg: ConfigDict, *, check_paths: bool = True) -> FuseJob:
    """The checked `FuseJob` of one task's ConfigDict (``check_paths``: inputs must exist).

    Raises `ConfigError` listing every problem, one line each, naming the field and value.
    A chained task's target adapter (``target.from_task`` set) is produced by an earlier
    task, so its existence is not checked.
    """
    job, problems = fuse_job_from(cfg)
    problems += job.problems(check_paths=check_paths)
    raise_problems(problems)
    return job


def lora_job_from(cfg: ConfigDict) -> LoraJob:
    """A train-lora ConfigDict as a `LoraJob`, unchecked."""
    lo = cfg.lora
    return LoraJob(
        task_name=cfg.task_name, output_dir=cfg.output_dir, seed=cfg.seed,
        model_path=cfg.model_path, template=cfg.template,
        data=_data(cfg.data_root, cfg.datasets, cfg.cutoff_len, cfg.min_bucket),
        lora=LoraSpec(target_modules=tuple(lo.target_modules), r=lo.r, alpha=_float(lo.alpha),
                      use_rslora=bool(lo.use_rslora), dropout=lo.dropout),
        # train-lora's schema has no b1/b2/eps: AdamW's defaults.
        optim=_optim(cfg.train, b1=0.9, b2=0.999, eps=1e-8),
        train=_train(cfg.train),
        init_adapter=os.path.expanduser(cfg.get("init_adapter", "")),
    )


def to_lora_job(cfg: ConfigDict, *, check_paths: bool = True) -> LoraJob:
    """The checked `LoraJob` of a train-lora ConfigDict; `ConfigError` lists every problem."""
    job = lora_job_from(cfg)
    raise_problems(job.problems(check_paths=check_paths))
    return job


def as_fuse_job(cfg_or_job: ConfigDict | FuseJob, *, check_paths: bool = True) -> FuseJob:
    """A ConfigDict converted and checked, or a `FuseJob` checked again (paths may have
    gone since it was made): what every fuse entry point calls first."""
    if isinstance(cfg_or_job, FuseJob):
        raise_problems(cfg_or_job.problems(check_paths=check_paths))
        return cfg_or_job
    return to_fuse_job(cfg_or_job, check_paths=check_paths)


def as_lora_job(cfg_or_job: ConfigDict | LoraJob, *, check_paths: bool = True) -> LoraJob:
    """`as_fuse_job` for train-lora."""
    if isinstance(cfg_or_job, LoraJob):
        raise_problems(cfg_or_job.problems(check_paths=check_paths))
        return cfg_or_job
    return to_lora_job(cfg_or_job, check_paths=check_paths)


# --------------------------------------------------------------------------- ConfigDict checks


def validate_config(cfg: ConfigDict, *, check_paths: bool = True) -> None:
    """`to_fuse_job` for its check only."""
    to_fuse_job(cfg, check_paths=check_paths)


def validate_configs(configs: Sequence[ConfigDict], *, check_paths: bool = True) -> None:
    """`validate_config` for every task of a file, plus the links between them."""
    problems: list[str] = []
    for cfg in configs:
        try:
            validate_config(cfg, check_paths=check_paths)
        except ConfigError as e:
            label = f"task {cfg.task_name!r}: " if len(configs) > 1 else ""
            problems.extend(label + p for p in e.problems)
    problems.extend(chain_problems(configs))
    raise_problems(problems)


def validate_train_config(cfg: ConfigDict, *, check_paths: bool = True) -> None:
    """`to_lora_job` for its check only."""
    to_lora_job(cfg, check_paths=check_paths)

