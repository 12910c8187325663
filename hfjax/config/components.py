"""The typed pieces jobs are made of: frozen dataclasses, each holding the one copy of its rules.

A component's ``check(at=...)`` returns its problems as one-line strings ``field=value: why``
(``at`` is the config section the fields are written under: ``"fusion"`` gives
``fusion.num_heads=3: ...``, ``""`` gives bare names); it never raises, so a job can collect
every problem of every component into one `ConfigError` (`hfjax.config.jobs`). Library code
below the config boundary takes these objects instead of a ConfigDict::

    plan_cfg = PlanConfig(block_size=4096, transfer_ratio="1/2")
    plan_cfg.check()             # []   (plan_cfg.ratio == 0.5)
    TransferNetConfig(embed_dim=32, num_heads=3).check()
    # ["fusion.num_heads=3: must divide fusion.embed_dim=32 (32 is not divisible by 3)"]

All components are hashable (their fields are scalars and tuples), so the ones the fuse step
needs can be parts of its static jit argument.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from hfjax.config.problems import ConfigError, is_number, problem, raise_problems
from hfjax.training.accumulation import WINDOW_MODES
from hfjax.training.data import DatasetRole
from hfjax.training.templates import TEMPLATES as _TEMPLATE_REGISTRY

__all__ = [
    "BASE_DTYPES",
    "GATES",
    "MESH_AXES",
    "RDM_ACTIVATIONS",
    "RDM_SORTS",
    "TEMPLATES",
    "DataSpec",
    "LoraSpec",
    "MeshConfig",
    "OptimizerConfig",
    "PlanConfig",
    "RDMConfig",
    "SourceSpec",
    "TargetSpec",
    "TrainConfig",
    "TransferNetConfig",
    "parse_transfer_ratio",
    "resolve_template",
    "run_problems",
    "sources_problems",
    "template_problems",
]

# Values the enumerated fields accept.
TEMPLATES = (*sorted(_TEMPLATE_REGISTRY), "auto")  # chat templates, "auto" = from model_type
GATES = ("svd", "open")  # the transfer network's denoising gate
RDM_ACTIVATIONS = ("relu", "prelu")  # the RDM's rectifier
RDM_SORTS = ("auto", "xla", "host")  # how the RDM sorts its projections
BASE_DTYPES = ("bfloat16", "float32")  # dtype of the frozen base weights
MESH_AXES = ("data", "fsdp", "tensor")  # the device mesh's axes


class _Checks:
    """Collects one component's problems under the section prefix ``at``."""

    def __init__(self, at: str):
        self.at = at
        self.problems: list[str] = []

    def name(self, field: str) -> str:
        return f"{self.at}.{field}" if self.at else field

    def bad(self, field: str, value: Any, why: str) -> None:
        self.problems.append(problem(self.name(field), value, why))

    def positive(self, field: str, value: Any, *, integer: bool = True) -> bool:
        ok = isinstance(value, int) if integer else is_number(value)
        if not ok or isinstance(value, bool) or value <= 0:
            self.bad(field, value, "must be a positive " + ("integer" if integer else "number"))
            return False
        return True

    def finite(self, field: str, value: Any) -> None:
        if not is_number(value):
            self.bad(field, value, "must be a finite number")

    def within(self, field: str, value: Any, low: float, high: float, *, closed: bool) -> None:
        inside = is_number(value) and low <= value and (value <= high if closed else value < high)
        if not inside:
            self.bad(field, value, f"must lie in [{low:g}, {high:g}{']' if closed else ')'}")

    def choice(self, field: str, value: Any, options: Sequence[str]) -> None:
        if value not in options:
            self.bad(field, value, f"must be one of {', '.join(options)}")

    def nonempty(self, field: str, value: Any) -> bool:
        if not isinstance(value, str) or not value:
            self.bad(field, value, "must be set")
            return False
        return True


def _adapter_problem(path: str) -> str | None:
    """Why ``path`` is not a PEFT adapter folder, or None."""
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


# --------------------------------------------------------------------------- who and where


def run_problems(task_name: Any, output_dir: Any, seed: Any) -> list[str]:
    """The rules of a job's identity fields (shared by the fuse and train-lora jobs)."""
    c = _Checks("")
    if c.nonempty("task_name", task_name) and (
            task_name in (".", "..") or any(ch in task_name for ch in "/\\\0")):
        c.bad("task_name", task_name, "must be a single plain folder name (no path "
              "separators, not '.' or '..')")
    c.nonempty("output_dir", output_dir)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        c.bad("seed", seed, "must be a non-negative integer")
    return c.problems


def template_problems(template: Any, field: str) -> list[str]:
    """The chat-template rule: a registered template (`hfjax.training.templates`) or "auto"."""
    c = _Checks("")
    c.choice(field, template, TEMPLATES)
    return c.problems


def resolve_template(template: str, model_type: str, *, field: str = "target.template") -> str:
    """The chat template to use: ``template`` itself, or for "auto" the family table's one."""
    if template != "auto":
        return template
    from hfjax.models.families import FAMILIES

    if model_type not in FAMILIES:
        raise ConfigError(
            f"{field}='auto': no template known for model_type {model_type!r}; "
            f"set {field} to one of {', '.join(TEMPLATES[:-1])}")
    return FAMILIES[model_type].template


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """The fuse job's target: base model, its LoRA, the replay data's chat template."""

    model_path: str  # base model folder (HF layout)
    adapter_path: str  # PEFT folder of the target LoRA
    template: str = "auto"  # chat template name, or "auto"
    from_task: str = ""  # the earlier task whose export is this target ("" = none)

    def check(self, *, check_paths: bool = True, at: str = "target") -> list[str]:
        c = _Checks(at)
        if c.nonempty("model_path", self.model_path) and check_paths and not os.path.exists(
                self.model_path):
            c.bad("model_path", self.model_path, "no such file or directory")
        # A chained target is produced by an earlier task, so it need not exist yet.
        if c.nonempty("adapter_path", self.adapter_path) and check_paths and not self.from_task:
            why = _adapter_problem(self.adapter_path)
            if why:
                c.bad("adapter_path", self.adapter_path, why)
        c.problems += template_problems(self.template, c.name("template"))
        return c.problems


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One source expert (names come from `hfjax.config.sources` when not given)."""

    name: str  # display name (reports, the plan)
    adapter_path: str  # PEFT folder of the source LoRA
    # Loading options (`configs.fuse.source_defaults`; checked by `hfjax.sources`):
    split_fused: bool = True  # split Phi-3 qkv_proj / gate_up_proj LoRAs into their parts
    config_path: str = ""  # the source base's config.json, read only for its head layout
    num_heads: int = 0  # attention heads of the source base (0 = unknown)
    num_kv_heads: int = 0  # key/value heads of the source base (0 = unknown)
    head_dim: int = 0  # head size of the source base (0 = unknown)


LAYER_ALIGNMENTS = ("tail", "head", "naive", "uniform")  # fusion.layer_alignment (§11)
UPDATE_MODES = ("b_only", "a_only", "ab_joint")  # fusion.update_mode (§11)
SOURCE_CONTROLS = ("none", "zero", "noise", "mismatch")  # fusion.source_control


def source_control_problems(control: Any, zero_sources: Any) -> list[str]:
    """The rules of ``fusion.source_control`` and its alias ``fusion.zero_sources``."""
    if control not in SOURCE_CONTROLS:
        return [problem("fusion.source_control", control,
                        f"must be one of {', '.join(SOURCE_CONTROLS)}")]
    if zero_sources and control not in ("none", "zero"):
        return [problem("fusion.zero_sources", zero_sources,
                        f"conflicts with fusion.source_control={control!r}; set only one")]
    return []


def sources_problems(sources: Sequence[SourceSpec], *, check_paths: bool = True,
                     at: str = "sources") -> list[str]:
    """The rules of the source list: at least one, unique names, adapters that exist."""
    c = _Checks(at)
    if not sources:
        c.problems.append(problem(at, tuple(sources), "at least one source adapter is needed"))
    names: set[str] = set()
    for i, source in enumerate(sources):
        if not source.name:
            c.bad(f"{i}.name", source.name, "must be set")
        elif source.name in names:
            c.bad(f"{i}.name", source.name, "two sources share this name")
        names.add(source.name)
        if not source.adapter_path:
            c.bad(f"{i}.adapter_path", source.adapter_path, "must be set")
        elif check_paths:
            why = _adapter_problem(source.adapter_path)
            if why:
                c.bad(f"{i}.adapter_path", source.adapter_path, why)
    return c.problems


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the replay / training records are and how they are cut into batches."""

    data_root: str  # folder with <name>.json / .jsonl (or a dataset_info.json)
    datasets: tuple[str, ...]  # dataset names under data_root
    cutoff_len: int = 1024  # most tokens per example
    min_bucket: int = 64  # smallest padded length
    # One per dataset: "main" | "replay:all" | "replay:<ratio>" (`DatasetRole`); () = all
    # pooled whole, in order.
    roles: tuple[str, ...] = ()

    def parsed_roles(self) -> tuple[DatasetRole, ...]:
        """:attr:`roles` parsed (call after `check`; `ValueError` on a bad one)."""
        return tuple(DatasetRole.parse(r) for r in self.roles)

    def check(self, *, check_paths: bool = True, find_datasets: bool = True,
              at: str = "data") -> list[str]:
        """``find_datasets``: also look each dataset up under ``data_root``."""
        c = _Checks(at)
        root_ok = c.nonempty("data_root", self.data_root)
        if root_ok and check_paths and not os.path.isdir(self.data_root):
            c.bad("data_root", self.data_root, "no such directory")
        if not self.datasets:
            c.bad("datasets", self.datasets, "at least one dataset is needed")
        for i, name in enumerate(self.datasets):
            if not isinstance(name, str) or not name:
                c.bad(f"datasets.{i}", name, "must be a dataset name")
            elif name in self.datasets[:i]:
                c.bad(f"datasets.{i}", name, "listed twice")
            elif (find_datasets and check_paths and root_ok and os.path.isdir(self.data_root)
                  and not _dataset_found(self.data_root, name)):
                c.bad(f"datasets.{i}", name, f"no {name}.json or {name}.jsonl (or "
                      f"dataset_info.json entry) in {c.name('data_root')}")
        c.problems += self._role_problems(c)
        cut = c.positive("cutoff_len", self.cutoff_len)
        if c.positive("min_bucket", self.min_bucket) and cut and self.min_bucket > self.cutoff_len:
            c.bad("min_bucket", self.min_bucket, f"must not exceed {c.name('cutoff_len')}")
        return c.problems

    def _role_problems(self, c: _Checks) -> list[str]:
        """The mix rules: one role per dataset, known kinds, replay ratio > 0, a main set."""
        if not self.roles:
            return []
        out = _Checks(c.at)
        if len(self.roles) != len(self.datasets):
            out.bad("roles", self.roles, f"needs one entry per dataset ({len(self.datasets)} in "
                    f"{c.name('datasets')}, {len(self.roles)} here)")
            return out.problems
        parsed = []
        for i, text in enumerate(self.roles):
            try:
                role = DatasetRole.parse(text)
            except ValueError as e:
                out.bad(f"roles.{i}", text, str(e))
                continue
            if role.ratio is not None and not (is_number(role.ratio) and role.ratio > 0):
                out.bad(f"roles.{i}", text, "the replay ratio must be a number > 0 (or 'all'); "
                        "to replay nothing, leave the dataset out")
            parsed.append(role)
        if len(parsed) == len(self.roles) and not any(r.kind == "main" for r in parsed):
            out.bad("roles", self.roles, "at least one dataset must be 'main' (replay ratios "
                    "count main records)")
        return out.problems


# --------------------------------------------------------------------------- fusion


def _ratio_value(x: Any) -> float | None:
    """A number, a numeric string or ``"a/b"`` as a float; None if it is none of these."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            if "/" in x:
                num, den = x.split("/")
                return float(num) / float(den)
            return float(x)
        except (ValueError, ZeroDivisionError):
            return None
    return None


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """How the topology plan cuts and aligns the adapters (docs/algorithm.md §2)."""

    block_size: int = 4096  # rows per block token
    transfer_ratio: float | str = 1.0  # as written: a number or "a/b"; `.ratio` is the float
    layer_alignment: str = "tail"  # how target and source layers pair (tail|head|naive|uniform)
    update_mode: str = "b_only"  # which target factors get patched (b_only|a_only|ab_joint)

    @property
    def ratio(self) -> float:
        """``transfer_ratio`` as a float (`ConfigError` if it is not a number or "a/b")."""
        value = _ratio_value(self.transfer_ratio)
        if value is None:
            raise ConfigError(f"transfer_ratio={self.transfer_ratio!r}: expected a number or 'a/b'")
        return value

    def check(self, *, at: str = "fusion") -> list[str]:
        c = _Checks(at)
        c.positive("block_size", self.block_size)
        value = _ratio_value(self.transfer_ratio)
        if value is None:
            c.bad("transfer_ratio", self.transfer_ratio, "expected a number or 'a/b'")
        elif not 0.0 < value <= 1.0:  # NaN fails too
            c.bad("transfer_ratio", self.transfer_ratio, "must lie in (0, 1]")
        c.choice("layer_alignment", self.layer_alignment, LAYER_ALIGNMENTS)
        c.choice("update_mode", self.update_mode, UPDATE_MODES)
        return c.problems


def parse_transfer_ratio(value: Any) -> float:
    """``transfer_ratio`` as a float: a number, a numeric string or ``"a/b"``, in (0, 1]."""
    settings = PlanConfig(transfer_ratio=value)
    raise_problems(settings.check())
    return settings.ratio


@dataclasses.dataclass(frozen=True)
class TransferNetConfig:
    """The transfer network's shape and gate (docs/algorithm.md §3-§5), one network per group."""

    embed_dim: int = 1024  # width E
    num_heads: int = 8  # attention heads (divide E)
    max_pos: int = 4096  # rows of the positional table
    mu_gate: float = 0.1  # gate shift
    gate: str = "svd"  # "svd" or "open"
    # Initial alpha of every group. Not part of equality/hash: it only sets initial values,
    # so runs that differ in it share the fuse step's compilation.
    alpha_init: float = dataclasses.field(default=0.3, compare=False)

    def network_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `hfjax.fusion.TransferNet` / `predict_delta_B`."""
        return dict(embed_dim=self.embed_dim, num_heads=self.num_heads, max_pos=self.max_pos,
                    mu_gate=self.mu_gate, gate=self.gate)

    def check(self, *, at: str = "fusion") -> list[str]:
        c = _Checks(at)
        embed = c.positive("embed_dim", self.embed_dim)
        heads = c.positive("num_heads", self.num_heads)
        c.positive("max_pos", self.max_pos)
        if embed and heads and self.embed_dim % self.num_heads:
            c.bad("num_heads", self.num_heads, f"must divide {c.name('embed_dim')}="
                  f"{self.embed_dim} ({self.embed_dim} is not divisible by {self.num_heads})")
        if embed and self.embed_dim < 4:
            c.bad("embed_dim", self.embed_dim, "must be at least 4 (the gate MLP is E//4 wide)")
        c.finite("mu_gate", self.mu_gate)
        c.finite("alpha_init", self.alpha_init)
        c.choice("gate", self.gate, GATES)
        return c.problems


@dataclasses.dataclass(frozen=True)
class RDMConfig:
    """The RDM regulariser (docs/algorithm.md §6)."""

    lambda_reg: float = 0.005  # weight of the RDM term
    mu_target: float = 0.0  # mean of the Gaussian reference
    sigma_target: float = 1.0  # its standard deviation
    num_projections: int = 2048  # random projections per evaluation
    activation: str = "relu"  # "relu" or "prelu"
    sort: str = "auto"  # "auto", "xla" or "host"

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `hfjax.fusion.average_rdm` / `rdm_loss`."""
        return dict(mu_target=self.mu_target, sigma_target=self.sigma_target,
                    num_projections=self.num_projections, activation=self.activation,
                    sort=self.sort)

    def check(self, *, at: str = "rdm") -> list[str]:
        c = _Checks(at)
        if not is_number(self.lambda_reg) or self.lambda_reg < 0:
            c.bad("lambda_reg", self.lambda_reg, "must be a non-negative number")
        c.finite("mu_target", self.mu_target)
        c.positive("sigma_target", self.sigma_target, integer=False)
        c.positive("num_projections", self.num_projections)
        c.choice("activation", self.activation, RDM_ACTIVATIONS)
        c.choice("sort", self.sort, RDM_SORTS)
        return c.problems


# --------------------------------------------------------------------------- optimisation


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + linear warmup + cosine decay (docs/algorithm.md §7); `build` makes the optax
    optimizer."""

    lr: float  # peak learning rate
    warmup_ratio: float = 0.05  # warmup steps = int(warmup_ratio * total steps)
    weight_decay: float = 0.01  # decoupled weight decay
    b1: float = 0.9  # first-moment decay
    b2: float = 0.999  # second-moment decay
    eps: float = 1e-8  # epsilon

    def build(self, steps: int) -> Any:
        """The optax AdamW whose schedule spans ``steps`` optimizer steps."""
        from hfjax.training.optim import adamw

        return adamw(self.lr, steps, warmup_ratio=self.warmup_ratio, b1=self.b1, b2=self.b2,
                     eps=self.eps, weight_decay=self.weight_decay)

    def check(self, *, at: str = "train") -> list[str]:
        c = _Checks(at)
        c.positive("lr", self.lr, integer=False)
        c.positive("eps", self.eps, integer=False)
        c.within("warmup_ratio", self.warmup_ratio, 0, 1, closed=True)
        c.within("b1", self.b1, 0, 1, closed=False)
        c.within("b2", self.b2, 0, 1, closed=False)
        if not (is_number(self.weight_decay) and self.weight_decay >= 0):
            c.bad("weight_decay", self.weight_decay, "must be a non-negative number")
        return c.problems


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop's cadence and the frozen base model's handling."""

    epochs: int = 3  # passes over the data
    batch_size: int = 1  # examples per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    max_steps: int = -1  # stop after this many steps (-1 = all epochs)
    log_every: int = 1  # metrics line every this many steps
    checkpoint_every: int = 50  # checkpoint every this many steps
    keep_checkpoints: int = 2  # checkpoints kept on disk
    remat: bool = False  # rematerialise the decoder layers in the backward pass
    base_dtype: str = "bfloat16"  # dtype of the frozen base weights
    # Accumulation windows: "original" (per-epoch, as the first release) or "continuous".
    windows: str = "original"
    scan_layers: bool = True  # run the decoder layers as one lax.scan (compile time flat in depth)

    def check(self, *, at: str = "train") -> list[str]:
        c = _Checks(at)
        for field in ("epochs", "batch_size", "grad_accum", "log_every", "checkpoint_every",
                      "keep_checkpoints"):
            c.positive(field, getattr(self, field))
        steps = self.max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not (steps == -1 or steps > 0):
            c.bad("max_steps", steps, "must be -1 (all epochs) or positive")
        c.choice("base_dtype", self.base_dtype, BASE_DTYPES)
        c.choice("windows", self.windows, WINDOW_MODES)
        return c.problems


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes and the logical-axis -> mesh-axis rules (`hfjax.sharding`)."""

    data: int = -1  # data-parallel size (-1 = the rest)
    fsdp: int = 1  # parameter-sharding size
    tensor: int = 1  # tensor-parallel size
    rules: tuple[tuple[str, Any], ...] = ()  # (logical axis, mesh axes | None), in order

    def check(self, *, at: str = "mesh") -> list[str]:
        c = _Checks(at)
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if isinstance(size, bool) or not (isinstance(size, int) and (size == -1 or size > 0)):
                c.bad(axis, size, "must be -1 (the rest) or positive")
        if list(sizes.values()).count(-1) > 1:
            c.problems.append(problem(at, sizes, "at most one axis may be -1"))
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2
                    and isinstance(rule[0], str)):
                c.bad(f"rules.{i}", rule, "must be (logical_axis, mesh_axes)")
                continue
            logical, target = rule
            axes = () if target is None else (target,) if isinstance(target, str) else tuple(
                target)
            if any(a not in MESH_AXES for a in axes):
                c.bad(f"rules.{i}", rule, f"mesh axes must be among {', '.join(MESH_AXES)}")
            if logical in seen:
                c.bad(f"rules.{i}", rule, f"logical axis {logical!r} appears twice")
            if logical == "lora_r" and axes:
                c.bad(f"rules.{i}", rule, "lora_r must never be sharded")
            seen.add(logical)
        return c.problems


# --------------------------------------------------------------------------- train-lora


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapter a train-lora job trains (PEFT LoRA semantics)."""

    target_modules: tuple[str, ...]  # projections adapted in every layer
    r: int = 8  # rank
    alpha: float = 16.0  # lora_alpha
    use_rslora: bool = False  # alpha / sqrt(r) instead of alpha / r
    dropout: float = 0.0  # only 0 is implemented

    def check(self, *, at: str = "lora") -> list[str]:
        from hfjax.models.families import ALL_LINEAR

        c = _Checks(at)
        c.positive("r", self.r)
        c.positive("alpha", self.alpha, integer=False)
        if not self.target_modules:
            c.bad("target_modules", self.target_modules, "at least one projection is needed")
        for m in self.target_modules:
            if m not in ALL_LINEAR:
                c.bad("target_modules", m,
                      f"unknown projection; choose from {', '.join(ALL_LINEAR)}")
        if self.dropout != 0:
            c.bad("dropout", self.dropout, "LoRA dropout is not implemented; use 0")
        return c.problems
