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
per bucket. The micro-batch stream (`hfjax.training.windows`), the loop with its
checkpoint/resume (`hfjax.training.loop`) and the schedule (AdamW, linear warmup over
``int(warmup_ratio · T)`` steps, cosine, ``T = (n_batches · epochs) // accum``) are the fuse
job's, so a resumed run re-enters the data exactly where its checkpoint left it and finishes
with the same adapter.

Outputs under ``<output_dir>/<task_name>/``: ``adapter/`` (PEFT: ``adapter_config.json`` +
``adapter_model.safetensors``, float32), ``checkpoints/`` (orbax), ``metrics.jsonl`` and
``train_report.json``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bridge import (
    LoraAdapter,
    LoraModule,
    load_adapter,
    make_adapter_config,
    module_rank_scale,
    save_adapter,
)
from hfjax import run_dir as rd
from hfjax.atomic import write_json_atomic
from hfjax.config import (
    ConfigError,
    LoraJob,
    OptimizerConfig,
    as_lora_job,
    load_train_config,
    resolve_template,
    validate_train_config,
)
from hfjax.errors import RunDiverged
from hfjax.loading import from_pretrained, load_tokenizer, resolve_dtype
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import module_names
from hfjax.training.data import ReplaySet, length_buckets, num_batches, resolve_dataset
from hfjax.training.fingerprint import fingerprint
from hfjax.training.loop import LoopSettings, run_loop
from hfjax.training.objective import lm_loss
from hfjax.training.optim import cosine_with_warmup, total_steps
from hfjax.training.windows import Window, micro_batch_stream, pad_id_of, windows

ConfigDict = ml_collections.ConfigDict
LoraParams = dict[str, dict[str, jax.Array]]

ADAPTER_SUBDIR = "adapter"
# Loading and checking live in `hfjax.config` (one loader for both jobs); re-exported here.
__all__ = ["ADAPTER_SUBDIR", "TrainRunError", "adapter_config", "init_lora", "load_train_config",
           "make_train_step", "target_names", "to_lora_adapter", "train_lora",
           "validate_train_config"]


TrainRunError = RunDiverged  # the old name: a non-finite loss or non-finite parameters


# ----------------------------------------------------------------------------- the adapter
def adapter_config(job: LoraJob) -> dict[str, Any]:
    """The exported ``adapter_config.json`` (PEFT LoRA, inference mode)."""
    alpha = float(job.lora.alpha)
    return make_adapter_config(
        r=int(job.lora.r), lora_alpha=int(alpha) if alpha.is_integer() else alpha,
        target_modules=list(job.lora.target_modules), base_model_name_or_path=job.model_path,
        use_rslora=bool(job.lora.use_rslora))


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
def _train_step_for(model_cfg: ModelConfig, remat: bool, optim: OptimizerConfig, steps: int):
    """(jitted step, optimizer), shared by calls with the same model and schedule, so a run
    resumed in the same process (or a second expert on the same base) reuses the compiles."""
    optimizer = optim.build(steps)
    return make_train_step(model_cfg, optimizer, remat=remat), optimizer


# ----------------------------------------------------------------------------- the run
def _compiles(step_fn: Any) -> int:
    try:
        return int(step_fn._cache_size())
    except AttributeError:  # pragma: no cover - private API
        return -1


def train_lora(cfg: ConfigDict | LoraJob, *, progress: bool = True,
               stop_after: int | None = None, restart: bool = False) -> Path:
    """Train the LoRA expert ``cfg`` describes; return its exported PEFT adapter directory.

    ``cfg`` is a train-lora ConfigDict (converted by `hfjax.config.to_lora_job`) or a
    `LoraJob`; either is checked on entry.

    Resumes from the latest checkpoint in ``<output_dir>/<task_name>/checkpoints`` when there
    is one (made for the same steps, seed, modules and rank; refused otherwise unless
    ``restart``, which deletes the old checkpoints and metrics first). ``stop_after``: stop
    after this many optimizer steps in this call, checkpointed and not exported (to test
    interruption); the run directory ``<output_dir>/<task_name>`` is returned then instead.

    Raises:
        ConfigError / DataError / AdapterError (``ValueError``s): bad input, before training.
        ResumeRefused (a ``ConfigError``): the checkpoint belongs to another run.
        RunDiverged: a non-finite loss or non-finite parameters (the last good checkpoint
            is kept).
    """
    job = as_lora_job(cfg)
    rd.check_task_name(job.task_name)
    run_dir = rd.inside(job.output_dir, job.task_name)
    rd.check_writable(job.output_dir)  # before any heavy work
    with rd.TaskLock(run_dir):
        rd.clean_partial_exports(run_dir)
        return _train_lora(job, run_dir, progress=progress, stop_after=stop_after,
                           restart=restart)


def lora_identity(job: LoraJob, steps: int) -> dict[str, Any]:
    """Everything that determines a train-lora run's result (`hfjax.training.fingerprint`)."""
    inputs: dict[str, Any] = {"model_config": Path(job.model_path) / "config.json"}
    if job.init_adapter:
        inputs["init_adapter"] = job.init_adapter
    for name in job.data.datasets:
        inputs[f"data.{name}"] = resolve_dataset(name, job.data.data_root)
    return fingerprint(job.to_dict(), inputs, steps=steps)


def _train_lora(job: LoraJob, run_dir: Path, *, progress: bool, stop_after: int | None,
                restart: bool) -> Path:
    t0 = time.time()
    model_cfg = ModelConfig.from_hf(job.model_path, source=str(Path(job.model_path) /
                                                               "config.json"))
    template = resolve_template(job.template, model_cfg.model_type, field="template")
    tokenizer = load_tokenizer(job.model_path)
    replay = ReplaySet.load(list(job.data.datasets), job.data.data_root, tokenizer, template,
                            job.data.cutoff_len)
    ada_cfg = adapter_config(job)
    names = target_names(model_cfg, job.lora.target_modules)
    scales = {n: jnp.asarray(module_rank_scale(ada_cfg, n)[1], jnp.float32) for n in names}

    tr = job.train
    n_batches = num_batches(len(replay), tr.batch_size)
    steps = total_steps(n_batches, tr.epochs, tr.grad_accum, tr.max_steps)
    step_fn, optimizer = _train_step_for(model_cfg, bool(tr.remat), job.optim, steps)
    # Every step's lr, on the host once: reading it per step would wait on the device.
    lrs = np.asarray(cosine_with_warmup(job.optim.lr, steps, job.optim.warmup_ratio)(
        jnp.arange(steps)))
    base = from_pretrained(job.model_path, dtype=resolve_dtype(tr.base_dtype)).params
    frozen = {"base": base, "scale": scales}
    params = init_lora(model_cfg, r=job.lora.r, target_modules=job.lora.target_modules,
                       key=jax.random.PRNGKey(job.seed))
    rank = int(job.lora.r)
    if job.init_adapter:  # continue an existing adapter: its factors, scales and config
        ada_cfg, params, scales, rank = _from_adapter(job.init_adapter, model_cfg)
        names = list(params)
    n_trainable = int(sum(p["A"].size + p["B"].size for p in params.values()))
    state = {"params": params, "opt_state": optimizer.init(params),
             "step": jnp.zeros((), jnp.int32)}
    # Commit the fresh state to its devices, as a restored one is: the jit cache keys on it,
    # so a fresh and a resumed run (in one process) share one compile.
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))

    settings = LoopSettings(total_steps=steps, log_every=tr.log_every,
                            checkpoint_every=tr.checkpoint_every,
                            keep_checkpoints=tr.keep_checkpoints, stop_after=stop_after,
                            restart=restart, desc=f"train-lora {job.task_name}")
    identity = {"modules": len(names), "r": rank, **lora_identity(job, steps)}
    pad_id = pad_id_of(tokenizer)
    buckets = length_buckets(job.data.cutoff_len, job.data.min_bucket)

    def batches(start: int) -> Iterator[Window]:
        stream = micro_batch_stream(replay, batch_size=tr.batch_size, epochs=tr.epochs,
                                    seed=job.seed, buckets=buckets, pad_id=pad_id,
                                    start=start * tr.grad_accum)
        return windows(stream, accum=tr.grad_accum, batch_size=tr.batch_size, pad_id=pad_id)

    def row(step: int, m: Mapping[str, Any]) -> dict[str, Any]:
        return {"loss": float(m["loss"]), "lr": float(lrs[step - 1]),
                "grad_norm": float(m["grad_norm"])}

    res = run_loop(lambda state, w: step_fn(state, frozen, w.batch, w.weights), state, batches,
                   settings, run_dir, identity, on_metrics=row, progress=progress)
    state = res.state
    if not res.finished:
        return run_dir

    rd.clear_complete(run_dir)  # the outputs are rewritten below; the marker comes last
    adapter = to_lora_adapter(state["params"], ada_cfg)
    adapter_dir = save_adapter(adapter, run_dir / ADAPTER_SUBDIR)
    report = {
        "task_name": job.task_name, "model_path": job.model_path, "template": template,
        "adapter_dir": str(adapter_dir), "modules": len(names),
        "trainable_params": n_trainable,
        "data": {k: dict(v) for k, v in replay.stats.items()},
        "run": {"steps": steps, "compilations": _compiles(step_fn), **res.timings(),
                "wall_seconds": round(time.time() - t0, 3)},
        "config": job.to_dict(),
    }
    write_json_atomic(run_dir / "train_report.json", report, default=float)
    outputs = [ADAPTER_SUBDIR, "train_report.json"]
    outputs += ["metrics.jsonl"] if (run_dir / "metrics.jsonl").exists() else []
    rd.mark_complete(run_dir, outputs, {"task_name": job.task_name})
    return adapter_dir
