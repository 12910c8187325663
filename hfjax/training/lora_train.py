"""`train_lora(cfg)`: train one LoRA expert in JAX and export it as a PEFT adapter.

The experts the paper fuses are ordinary LoRAs (r 8, 3 epochs, lr 1e-4); this trains one
through the same pure forward the fusion uses, with the frozen base model as an argument::

    cfg = load_train_config("configs/train_lora.py", ["model_path=...", "datasets=a,b"])
    adapter_dir = train_lora(cfg)     # <output_dir>/<task_name>/adapter/

    trained:  {"model.layers.3.self_attn.q_proj": {"A": f32(r, d_in), "B": f32(d_out, r)}, ...}
    frozen:   {"base": the model's params (bf16 or f32), "scale": {name: f32()}}
    forward:  lm_loss(base, cfg, batch, {name: {"A", "B", "scale"}})

Initialisation is PEFT's ``reset_lora_parameters`` (``init_lora_weights=True``): ``A`` from
``kaiming_uniform_(a=sqrt(5))`` on the ``(r, d_in)`` weight, i.e. ``U(-1/sqrt(d_in),
1/sqrt(d_in))``, and ``B = 0``, so the untrained adapter is the base model. Every module's
key is ``fold_in(PRNGKey(seed), its index)`` in ``module_names`` order.

One jitted step = one optimizer update over ``grad_accum`` micro-batches stacked to
``(accum, B, L)`` and summed with a `lax.scan` (the loss is the mean of the micro-batches'
mean token losses, as the fuse step); ``L`` is a length bucket, so the step compiles once
per bucket. The micro-batch stream, checkpoint/resume and the schedule (AdamW, linear warmup
over ``int(warmup_ratio · T)`` steps, cosine, ``T = (n_batches · epochs) // accum``) are the
fuse loop's (`hfjax.training.fuse_loop`), so a resumed run re-enters the data exactly where
its checkpoint left it and finishes with the same adapter.

Outputs under ``<output_dir>/<task_name>/``: ``adapter/`` (PEFT: ``adapter_config.json`` +
``adapter_model.safetensors``, float32), ``checkpoints/`` (orbax), ``metrics.jsonl`` and
``train_report.json``.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import yaml

from bridge import (
    LoraAdapter,
    LoraModule,
    load_adapter,
    make_adapter_config,
    module_rank_scale,
    save_adapter,
)
from configs import train_lora as _schema_module
from hfjax.config_io import (
    ConfigError,
    apply_overrides,
    check_train_fields,
    config_to_dict,
    expand_env,
    import_get_config,
)
from hfjax.config_io import is_number as _number
from hfjax.loading import from_pretrained, load_tokenizer, resolve_dtype
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import module_names
from hfjax.training import checkpointing
from hfjax.training.data import ReplaySet, length_buckets, num_batches
from hfjax.training.fuse_loop import (
    FAMILY_TEMPLATE,
    micro_batch_stream,
    stack_window,
)
from hfjax.training.objective import lm_loss
from hfjax.training.optim import adamw, cosine_with_warmup, total_steps
from hfjax.training.templates import TEMPLATES as _TEMPLATE_REGISTRY

ConfigDict = ml_collections.ConfigDict
LoraParams = dict[str, dict[str, jax.Array]]

ALL_LINEAR = _schema_module.ALL_LINEAR
TEMPLATES = (*sorted(_TEMPLATE_REGISTRY), "auto")
BASE_DTYPES = ("bfloat16", "float32")
ADAPTER_SUBDIR = "adapter"
_PATH_FIELDS = ("model_path", "data_root", "output_dir", "init_adapter")


class TrainRunError(RuntimeError):
    """A run that had to stop (a non-finite loss); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- config
def _leaves(cfg: ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key in cfg.keys():
        value = cfg[key]
        if isinstance(value, ConfigDict):
            out.extend(_leaves(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _node(cfg: ConfigDict, path: str) -> tuple[ConfigDict, str]:
    parent, _, leaf = path.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else ():
        node = node[part]
    return node, leaf


def _conform(user: Mapping[str, Any] | ConfigDict, label: str) -> ConfigDict:
    """The schema's defaults overlaid with ``user``'s fields; unknown fields are errors."""
    import difflib

    cfg = _schema_module.get_config()
    if not isinstance(user, ConfigDict):
        user = ConfigDict(dict(user))
    valid = [p for p, _ in _leaves(cfg)]
    for path, value in _leaves(user):
        if path not in valid:
            close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{label}: unknown field '{path}'{hint}")
        node, leaf = _node(cfg, path)
        if isinstance(value, list):
            value = tuple(value)
        expected = node.get_type(leaf)
        if isinstance(value, bool) and expected in (int, float):
            raise ConfigError(f"{label}: {path}={value!r}: expected {expected.__name__}")
        try:
            node[leaf] = copy.deepcopy(value)
        except TypeError:
            raise ConfigError(f"{label}: {path}={value!r}: expected {expected.__name__}, got "
                              f"{type(value).__name__}") from None
    return cfg


def _read_file(spec: str) -> ConfigDict:
    file, _, arg = spec.partition(":") if spec.split(":")[0].endswith(".py") else (spec, "", "")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{file}: no such config file")
    suffix = path.suffix.lower()
    if suffix == ".py":
        get_config = import_get_config(file)
        user = get_config(arg) if arg else get_config()
        if not isinstance(user, ConfigDict):
            raise ConfigError(f"{spec}: get_config() must return a ConfigDict")
        return _conform(user, spec)
    if suffix in (".yaml", ".yml", ".json"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: cannot parse ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of fields")
        return _conform(data, file)
    raise ConfigError(f"{spec}: expected a .py, .yaml, .yml or .json config file")


def load_train_config(path: str | os.PathLike[str] | None = None,
                      overrides: Sequence[str] = ()) -> ConfigDict:
    """Load a train-lora config (schema: ``configs/train_lora.py``), apply overrides, lock it.

    ``path`` is a ``.py`` file with ``get_config()`` (``FILE.py:ARG`` calls
    ``get_config(ARG)``), a ``.yaml``/``.json`` mapping of fields (nested sections or the
    schema's nesting), or ``None`` for the defaults. ``overrides`` are ``"train.lr=3e-4"``
    strings (``--config.`` prefix accepted). ``${VAR}`` / ``$VAR`` are expanded in every
    string field and ``~`` in the path fields. Unknown fields and wrong types raise
    `ConfigError` naming the file and the field; call `validate_train_config` for values.
    """
    spec = "defaults" if path is None else os.fspath(path)
    cfg = _schema_module.get_config() if path is None else _read_file(spec)
    overrides = [expand_env(o, where=f"{spec}: override {o!r}") for o in overrides]
    apply_overrides(cfg, overrides, where=f"{spec}: override")
    for field, value in _leaves(cfg):
        node, leaf = _node(cfg, field)
        if isinstance(value, str):
            node[leaf] = expand_env(value, where=f"{spec}: field '{field}'")
        elif isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            node[leaf] = tuple(expand_env(v, where=f"{spec}: field '{field}'") for v in value)
    for field in _PATH_FIELDS:
        cfg[field] = os.path.expanduser(cfg[field])
    cfg.lock()
    return cfg


def validate_train_config(cfg: ConfigDict, *, check_paths: bool = True) -> None:
    """Check every value (and, with ``check_paths``, that the inputs exist).

    Raises `ConfigError` listing every problem, one line each, naming the field and value.
    """
    problems: list[str] = []

    def bad(field: str, value: Any, why: str) -> None:
        problems.append(f"{field}={value!r}: {why}")

    def get(field: str) -> Any:
        node, leaf = _node(cfg, field)
        return node[leaf]

    def positive(field: str, *, integer: bool = True) -> None:
        value = get(field)
        ok = isinstance(value, int) if integer else _number(value)
        if not ok or isinstance(value, bool) or value <= 0:
            bad(field, value, "must be a positive " + ("integer" if integer else "number"))

    if check_paths and cfg.init_adapter and not os.path.isdir(cfg.init_adapter):
        bad("init_adapter", cfg.init_adapter, "no such adapter directory")
    for field in ("model_path", "data_root", "output_dir", "task_name"):
        if not isinstance(get(field), str) or not get(field):
            bad(field, get(field), "must be set")
    if cfg.task_name and any(c in cfg.task_name for c in "/\\"):
        bad("task_name", cfg.task_name, "must not contain path separators")
    if check_paths and cfg.model_path and not os.path.isfile(
            os.path.join(cfg.model_path, "config.json")):
        why = "no such directory" if not os.path.isdir(cfg.model_path) else "has no config.json"
        bad("model_path", cfg.model_path, why)
    if check_paths and cfg.data_root and not os.path.isdir(cfg.data_root):
        bad("data_root", cfg.data_root, "no such directory")
    if cfg.template not in TEMPLATES:
        bad("template", cfg.template, f"must be one of {', '.join(TEMPLATES)}")
    if not cfg.datasets:
        bad("datasets", cfg.datasets, "at least one dataset is needed")
    for i, name in enumerate(cfg.datasets):
        if not isinstance(name, str) or not name:
            bad(f"datasets.{i}", name, "must be a dataset name")
        elif name in cfg.datasets[:i]:
            bad(f"datasets.{i}", name, "listed twice")
    positive("cutoff_len")
    positive("min_bucket")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        bad("seed", cfg.seed, "must be a non-negative integer")

    positive("lora.r")
    positive("lora.alpha", integer=False)
    mods = cfg.lora.target_modules
    if not mods:
        bad("lora.target_modules", mods, "at least one projection is needed")
    for m in mods:
        if m not in ALL_LINEAR:
            bad("lora.target_modules", m,
                f"unknown projection; choose from {', '.join(ALL_LINEAR)}")
    if cfg.lora.dropout != 0:
        bad("lora.dropout", cfg.lora.dropout, "LoRA dropout is not implemented; use 0")

    positive("train.epochs")
    positive("train.lr", integer=False)
    if not (_number(cfg.train.warmup_ratio) and 0 <= cfg.train.warmup_ratio <= 1):
        bad("train.warmup_ratio", cfg.train.warmup_ratio, "must lie in [0, 1]")
    check_train_fields(cfg.train, bad, positive)
    if cfg.train.base_dtype not in BASE_DTYPES:
        bad("train.base_dtype", cfg.train.base_dtype, f"must be one of {', '.join(BASE_DTYPES)}")
    if problems:
        raise ConfigError("\n".join(problems), problems)


# ----------------------------------------------------------------------------- the adapter
def adapter_config(cfg: ConfigDict) -> dict[str, Any]:
    """The exported ``adapter_config.json`` (PEFT LoRA, inference mode)."""
    alpha = float(cfg.lora.alpha)
    return make_adapter_config(
        r=int(cfg.lora.r), lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        target_modules=list(cfg.lora.target_modules), base_model_name_or_path=cfg.model_path,
        use_rslora=bool(cfg.lora.use_rslora))


def target_names(model_cfg: ModelConfig, target_modules: Sequence[str]) -> list[str]:
    """The adapted module paths, in `module_names` order (layer, then projection)."""
    wanted = set(target_modules)
    return [n for n in module_names(model_cfg) if n.rsplit(".", 1)[-1] in wanted]


def init_lora(model_cfg: ModelConfig, *, r: int, target_modules: Sequence[str],
              key: jax.Array) -> LoraParams:
    """PEFT's default init: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` (r, d_in), ``B = 0``.

    (``kaiming_uniform_(a=sqrt(5))``: gain ``sqrt(2 / 6)``, bound ``gain · sqrt(3 / fan_in)``
    ``= 1 / sqrt(d_in)``.) Float32; module ``i`` draws from ``fold_in(key, i)``.
    """
    shapes = module_names(model_cfg)
    params = {}
    for i, name in enumerate(target_names(model_cfg, target_modules)):
        d_in, d_out = shapes[name]
        bound = 1.0 / math.sqrt(d_in)
        params[name] = {
            "A": jax.random.uniform(jax.random.fold_in(key, i), (r, d_in), jnp.float32,
                                    -bound, bound),
            "B": jnp.zeros((d_out, r), jnp.float32),
        }
    return params


def to_lora_adapter(params: LoraParams, config: Mapping[str, Any]) -> LoraAdapter:
    """Trained A/B (float32) as a `bridge.LoraAdapter` with ``config``'s per-module scales."""
    host = jax.device_get(params)
    mods = {}
    for name, p in host.items():
        _, scale = module_rank_scale(config, name)
        mods[name] = LoraModule(name=name, A=np.asarray(p["A"], np.float32),
                                B=np.asarray(p["B"], np.float32), scale=scale)
    return LoraAdapter(config=dict(config), modules=mods)


def _from_adapter(path: str, model_cfg: ModelConfig
                  ) -> tuple[dict[str, Any], LoraParams, dict[str, jax.Array], int]:
    """``init_adapter``: (adapter config, float32 A/B, per-module scales, max rank)."""
    from hfjax.models.decoder import check_adapter

    init = load_adapter(path)
    try:
        check_adapter(init.to_jax(), model_cfg, where=f"init_adapter {path}")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    params = {n: {"A": jnp.asarray(m.A, jnp.float32), "B": jnp.asarray(m.B, jnp.float32)}
              for n, m in init.modules.items()}
    scales = {n: jnp.asarray(m.scale, jnp.float32) for n, m in init.modules.items()}
    config = {**init.config, "inference_mode": True}
    return config, params, scales, max(m.rank for m in init.modules.values())


# ----------------------------------------------------------------------------- the step
def make_train_step(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, *,
                    remat: bool = False, donate: bool = True):
    """The jitted step ``step(state, frozen, micro_batches, weights) -> (state, metrics)``.

    ``state`` = {"params": {name: {"A", "B"}}, "opt_state", "step"}; ``frozen`` = {"base",
    "scale": {name: ()}}; ``micro_batches`` arrays are (accum, B, L); ``weights`` (accum,) is
    1 for a real micro-batch and 0 for filler. Loss = Σ w_i · LM_i / Σ w_i.
    """

    def loss_fn(params: LoraParams, frozen: dict[str, Any], batch: dict) -> jax.Array:
        adapter = {n: {"A": p["A"], "B": p["B"], "scale": frozen["scale"][n]}
                   for n, p in params.items()}
        return lm_loss(frozen["base"], model_cfg, batch, adapter, remat=remat)

    def step(state, frozen, micro_batches, weights):
        params = state["params"]

        def micro(carry, xs):
            loss_sum, grads = carry
            batch, w = xs
            loss, g = jax.value_and_grad(loss_fn)(params, frozen, batch)
            return (loss_sum + w * loss, jax.tree.map(lambda a, b: a + w * b, grads, g)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, grads), _ = jax.lax.scan(micro, zeros, (micro_batches, weights))
        n = jnp.maximum(jnp.sum(weights), 1.0)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
               "step": state["step"] + 1}
        return new, {"loss": loss_sum / n, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0,) if donate else ())


@functools.lru_cache(maxsize=4)
def _train_step_for(model_cfg: ModelConfig, remat: bool, lr: float, steps: int,
                    warmup_ratio: float, weight_decay: float):
    """(jitted step, optimizer), shared by calls with the same model and schedule, so a run
    resumed in the same process (or a second expert on the same base) reuses the compiles."""
    optimizer = adamw(lr, steps, warmup_ratio=warmup_ratio, weight_decay=weight_decay)
    return make_train_step(model_cfg, optimizer, remat=remat), optimizer


# ----------------------------------------------------------------------------- the run
def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"train-lora {desc}",
                unit="step", file=sys.stderr, dynamic_ncols=True)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


def _trim_metrics(path: Path, keep_through: int) -> None:
    """Drop metrics lines past the restored step (written after the last checkpoint)."""
    if not path.exists():
        return
    if keep_through == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_through]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _peek_meta(step_dir: Path) -> dict[str, Any]:
    """A checkpoint's JSON metadata read straight from orbax's layout ({} if not readable),
    to refuse a mismatched checkpoint before orbax tries to restore it."""
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _compiles(step_fn: Any) -> int:
    try:
        return int(step_fn._cache_size())
    except AttributeError:  # pragma: no cover - private API
        return -1


def train_lora(cfg: ConfigDict, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train the LoRA expert ``cfg`` describes; return its exported PEFT adapter directory.

    Resumes from the latest checkpoint in ``<output_dir>/<task_name>/checkpoints`` when there
    is one (made for the same number of total steps). ``stop_after``: stop after this many
    optimizer steps in this call, checkpointed and not exported (to test interruption); the
    run directory ``<output_dir>/<task_name>`` is returned then instead.

    Raises:
        ConfigError / DataError / AdapterError (``ValueError``s): bad input, before training.
        TrainRunError: a non-finite loss (the last good checkpoint is kept).
    """
    validate_train_config(cfg)
    t0 = time.time()
    run_dir = Path(cfg.output_dir) / cfg.task_name
    model_cfg = ModelConfig.from_hf(cfg.model_path, source=str(Path(cfg.model_path) /
                                                               "config.json"))
    if cfg.template == "auto":
        if model_cfg.model_type not in FAMILY_TEMPLATE:
            raise ConfigError(f"template='auto': no template known for model_type "
                              f"{model_cfg.model_type!r}; set template")
        template = FAMILY_TEMPLATE[model_cfg.model_type]
    else:
        template = cfg.template
    tokenizer = load_tokenizer(cfg.model_path)
    replay = ReplaySet.load(list(cfg.datasets), cfg.data_root, tokenizer, template,
                            cfg.cutoff_len)
    ada_cfg = adapter_config(cfg)
    names = target_names(model_cfg, cfg.lora.target_modules)
    scales = {n: jnp.asarray(module_rank_scale(ada_cfg, n)[1], jnp.float32) for n in names}

    tr = cfg.train
    n_batches = num_batches(len(replay), tr.batch_size)
    steps = total_steps(n_batches, tr.epochs, tr.grad_accum, tr.max_steps)
    step_fn, optimizer = _train_step_for(model_cfg, bool(tr.remat), float(tr.lr), steps,
                                         float(tr.warmup_ratio), float(tr.weight_decay))
    schedule = cosine_with_warmup(tr.lr, steps, tr.warmup_ratio)
    base = from_pretrained(cfg.model_path, dtype=resolve_dtype(tr.base_dtype)).params
    frozen = {"base": base, "scale": scales}
    params = init_lora(model_cfg, r=cfg.lora.r, target_modules=cfg.lora.target_modules,
                       key=jax.random.PRNGKey(cfg.seed))
    rank = int(cfg.lora.r)
    if cfg.init_adapter:  # continue an existing adapter: its factors, scales and config
        ada_cfg, params, scales, rank = _from_adapter(cfg.init_adapter, model_cfg)
        names = list(params)
    n_trainable = int(sum(p["A"].size + p["B"].size for p in params.values()))
    state = {"params": params, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    # Commit the fresh state to its devices, as a restored one is: the jit cache keys on it,
    # so a fresh and a resumed run (in one process) share one compile.
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))

    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpointing.Checkpointer(run_dir / "checkpoints", keep=tr.keep_checkpoints)
    meta = {"task_name": cfg.task_name, "steps": steps, "seed": cfg.seed,
            "modules": len(names), "r": rank}
    if ckpt.latest_step() is not None:
        saved = _peek_meta(ckpt.directory / str(ckpt.latest_step()))
        for key in ("steps", "modules", "r"):
            if key in saved and saved[key] != meta[key]:
                raise ConfigError(
                    f"{ckpt.directory}: checkpoint was made for {key}={saved[key]}, this config "
                    f"gives {meta[key]}; use another output_dir (or task_name)")
        try:
            state, saved = ckpt.restore(state)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds on a tree mismatch
            raise ConfigError(
                f"{ckpt.directory}: cannot resume from step {ckpt.latest_step()} (made for "
                f"another rank, target_modules or model? {type(e).__name__}); use another "
                f"output_dir") from e
        if saved.get("steps") != steps:
            raise ConfigError(f"{ckpt.directory}: checkpoint was made for {saved.get('steps')} "
                              f"total steps, this config gives {steps}; use another output_dir")
    start_step = int(state["step"])
    metrics_file = run_dir / "metrics.jsonl"
    _trim_metrics(metrics_file, start_step)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    stream = micro_batch_stream(replay, batch_size=tr.batch_size, epochs=tr.epochs,
                                seed=cfg.seed, buckets=length_buckets(cfg.cutoff_len,
                                                                      cfg.min_bucket),
                                pad_id=pad_id, start=start_step * tr.grad_accum)
    bar = _progress(steps, start_step, progress, cfg.task_name)
    step, tokens, t_train = start_step, 0, time.time()
    pending: list[float] = []
    step_seconds: list[float] = []  # wall time of each step of this call (the first compiles)
    try:
        with metrics_file.open("a") as mf:
            while step < steps:
                window = [b for _, b in zip(range(tr.grad_accum), stream, strict=False)]
                if not window:
                    break
                batch, weights = stack_window(window, tr.grad_accum, tr.batch_size, pad_id)
                lr = float(schedule(step))
                t_step = time.time()
                state, m = step_fn(state, frozen, batch, weights)
                m = jax.device_get(m)
                step_seconds.append(time.time() - t_step)
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise TrainRunError(
                        f"non-finite loss {loss} at step {step + 1}; stopped, the last good "
                        f"checkpoint (step {ckpt.latest_step()}) is kept in {ckpt.directory}")
                step += 1
                tokens += int(sum(int(b["attention_mask"].sum()) for b in window))
                pending.append(loss)
                if step % tr.log_every == 0 or step == steps:
                    rec = {"step": step, "loss": float(np.mean(pending)), "lr": lr,
                           "grad_norm": float(m["grad_norm"]),
                           "time": round(time.time() - t0, 3)}
                    mf.write(json.dumps(rec) + "\n")
                    mf.flush()
                    pending = []
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if step % tr.checkpoint_every == 0 or step == steps:
                    ckpt.save(step, state, meta)
                if stop_after is not None and step - start_step >= stop_after and step < steps:
                    ckpt.save(step, state, meta)
                    return run_dir
    finally:
        bar.close()
        ckpt.wait()
    train_time = time.time() - t_train

    adapter = to_lora_adapter(state["params"], ada_cfg)
    adapter_dir = save_adapter(adapter, run_dir / ADAPTER_SUBDIR)
    done = step - start_step
    report = {
        "task_name": cfg.task_name, "model_path": cfg.model_path, "template": template,
        "adapter_dir": str(adapter_dir), "modules": len(names),
        "trainable_params": n_trainable,
        "data": {k: dict(v) for k, v in replay.stats.items()},
        "run": {"steps": steps, "resumed_from_step": start_step, "steps_this_call": done,
                "compilations": _compiles(step_fn), "train_seconds": round(train_time, 3),
                "first_step_seconds": round(step_seconds[0], 4) if step_seconds else None,
                "seconds_per_step": (round(float(np.median(step_seconds[1:])), 5)
                                     if len(step_seconds) > 1 else None),
                "tokens_this_call": tokens,
                "tokens_per_second": round(tokens / max(train_time, 1e-9), 2),
                "wall_seconds": round(time.time() - t0, 3)},
        "config": config_to_dict(cfg),
    }
    _write_json_atomic(run_dir / "train_report.json", report)
    return adapter_dir


def main(config_path: str | None, overrides: Sequence[str], quiet: bool = False) -> int:
    """``hfjax train-lora``: load + validate the config, train, print where the adapter is."""
    cfg = load_train_config(config_path, overrides)
    adapter_dir = train_lora(cfg, progress=not quiet)
    report = json.loads((adapter_dir.parent / "train_report.json").read_text())
    run = report["run"]
    print(f"adapter: {adapter_dir}")
    print(f"report: {adapter_dir.parent / 'train_report.json'}  steps {run['steps']}, "
          f"compilations {run['compilations']}, first step {run['first_step_seconds']} s, then "
          f"{run['seconds_per_step']} s/step, "
          f"{run['tokens_per_second']} tokens/s")
    return 0
