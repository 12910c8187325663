"""`run_fusion(cfg)`: the whole HeteroFusion job, from a config to a fused PEFT adapter.

Stages (each fails early with one clear line)::

    adapters -> plan (topology)  -> block contexts      (hfjax.fusion)
    tokenizer + replay JSON      -> padded micro-batches (hfjax.training.data)
    base model (frozen, bf16 ok) -> jitted fuse_step     (hfjax.training.fuse_step)
    orbax checkpoints every N steps, resume from the latest
    export: <output_dir>/<task_name>/merged_lora/ + fusion_report.json + metrics.jsonl

The micro-batch stream is the concatenation of the epochs' shuffled orders; optimizer step
``s`` consumes micro-batches ``[s·accum, (s+1)·accum)``, so a resumed run re-enters the stream
exactly where the checkpoint left it (``T = (n_batches · epochs) // accum`` as the original).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bridge import LoraAdapter, load_adapter, save_adapter
from hfjax import sharding as shd
from hfjax.fusion import (
    FusionPlan,
    build_contexts,
    build_plan,
    init_fusion_params,
    param_count,
)
from hfjax.loading import from_pretrained, load_tokenizer, resolve_dtype
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import is_stacked, layer_plan, stack_layers
from hfjax.models.families import template_for
from hfjax.models.key_tables import logical_axes_tree
from hfjax.training import checkpointing
from hfjax.training.data import ReplaySet, length_buckets, num_batches
from hfjax.training.fuse_step import FuseStatics, fuse_step, run_networks
from hfjax.training.optim import total_steps


class FuseRunError(RuntimeError):
    """A run that had to stop (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclasses.dataclass
class FusionResult:
    output_dir: Path  # <output_dir>/<task_name>
    adapter_dir: Path | None  # .../merged_lora (None for a dry run)
    report: dict[str, Any]
    steps: int
    compilations: int
    history: list[dict[str, Any]]


# ----------------------------------------------------------------------------- inputs
def source_specs(cfg: Any) -> list[tuple[str, str]]:
    """``cfg.sources`` as [(name, adapter_path)]: dicts/ConfigDicts or "name=path,..." text."""
    raw = cfg.sources
    if isinstance(raw, str):
        items = [s for s in raw.split(",") if s.strip()]
        out = []
        for i, s in enumerate(items):
            name, _, path = s.partition("=")
            out.append((name.strip(), path.strip()) if path else (f"source{i}", name.strip()))
        return out
    out = []
    for i, s in enumerate(raw or ()):
        if isinstance(s, str):
            out.append((f"source{i}", s))
        else:
            out.append((str(s.get("name") or f"source{i}"), str(s["adapter_path"])))
    return out


def resolve_template(cfg: Any, model_cfg: ModelConfig) -> str:
    t = cfg.target.template
    return template_for(model_cfg.model_type) if t in ("", "auto", None) else t


@dataclasses.dataclass
class Inputs:
    target: LoraAdapter
    sources: list[LoraAdapter]
    source_names: list[str]
    plan: FusionPlan
    contexts: dict[str, Any]
    model_cfg: ModelConfig
    replay: ReplaySet
    tokenizer: Any
    template: str


def prepare(cfg: Any) -> Inputs:
    """Load and check everything that does not need the base weights (fast, for --dry_run)."""
    target = load_adapter(cfg.target.adapter_path)
    specs = source_specs(cfg)
    if not specs:
        raise ValueError("config: sources is empty (give at least one source adapter)")
    sources = [load_adapter(p) for _, p in specs]
    names = [n for n, _ in specs]
    plan = build_plan(target, sources, block_size=cfg.fusion.block_size,
                      transfer_ratio=cfg.fusion.transfer_ratio, source_names=names)
    contexts = build_contexts(plan, target, sources)
    if cfg.fusion.zero_sources:  # ablation: is the gain from the sources or from replay alone?
        contexts = {g: [{**c, "src": np.zeros_like(c["src"]), "src_s": np.zeros_like(c["src_s"])}
                        for c in buckets] for g, buckets in contexts.items()}
    model_cfg = ModelConfig.from_hf(cfg.target.model_path,
                                    source=str(Path(cfg.target.model_path) / "config.json"))
    tokenizer = load_tokenizer(cfg.target.model_path)
    template = resolve_template(cfg, model_cfg)
    replay = ReplaySet.load(list(cfg.data.datasets), cfg.data.data_root, tokenizer, template,
                            cfg.data.cutoff_len)
    if len(replay) == 0:
        raise ValueError(f"{cfg.data.data_root}: the replay set is empty")
    return Inputs(target, sources, names, plan, contexts, model_cfg, replay, tokenizer, template)


# ----------------------------------------------------------------------------- batches
def micro_batch_stream(replay: ReplaySet, *, batch_size: int, epochs: int, seed: int,
                       buckets: Sequence[int], pad_id: int, start: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
    """All epochs' micro-batches in order, from global micro-batch index ``start``."""
    from hfjax.training.data import iterate_batches

    per_epoch = num_batches(len(replay.examples), batch_size)
    epoch, first = divmod(start, per_epoch)
    for e in range(epoch, epochs):
        yield from iterate_batches(replay.examples, batch_size=batch_size, epoch=e, seed=seed,
                                   buckets=buckets, pad_id=pad_id, start=first)
        first = 0


def stack_window(window: list[dict[str, np.ndarray]], accum: int, batch_size: int,
                 pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pad a window's micro-batches to one length and batch size, stack to (accum, B, L).

    Filler micro-batches (when the window is short) get weight 0 and no supervised tokens.
    """
    length = max(b["input_ids"].shape[1] for b in window)
    out = {"input_ids": np.full((accum, batch_size, length), pad_id, np.int32),
           "attention_mask": np.zeros((accum, batch_size, length), np.int32),
           "labels": np.full((accum, batch_size, length), -100, np.int32)}
    for i, b in enumerate(window):
        n, t = b["input_ids"].shape
        for k in out:
            out[k][i, :n, :t] = b[k]
    weights = np.zeros(accum, np.float32)
    weights[: len(window)] = 1.0
    return out, weights


# ----------------------------------------------------------------------------- reporting
def dry_run_text(cfg: Any, inp: Inputs) -> str:
    from hfjax.fusion import net_param_count

    f = cfg.fusion
    lines = [inp.plan.describe(), "", "replay data:", inp.replay.summary(), ""]
    n_batches = num_batches(len(inp.replay), cfg.train.batch_size)
    steps = total_steps(n_batches, cfg.train.epochs, cfg.train.grad_accum, cfg.train.max_steps)
    per_group = {g.name: net_param_count(inp.plan.block_size, g.rank, f.embed_dim, f.num_heads,
                                         f.max_pos, f.gate) for g in inp.plan.groups}
    total = sum(per_group.values()) + len(per_group)
    lines.append("transfer networks (one per group):")
    for g, n in per_group.items():
        lines.append(f"  {g:<16} {n / 1e6:10.2f} M params")
    lines.append(f"  total trainable: {total / 1e6:.2f} M (+ AdamW moments: "
                 f"{3 * total * 4 / 2**30:.2f} GiB for params + 2 moments, float32)")
    lines.append(f"optimizer steps: {steps} (batches/epoch {n_batches}, epochs "
                 f"{cfg.train.epochs}, accum {cfg.train.grad_accum})")
    lines.append(layer_plan(inp.model_cfg, inp.target.modules,
                            stacked=bool(cfg.train.get("scan_layers", True))))
    try:
        from hfjax.memory import memory_plan_text

        lines += ["", memory_plan_text(cfg, inp.model_cfg, inp.plan)]
    except ImportError:
        pass
    return "\n".join(lines)


def attention_by_source(plan: FusionPlan, sources: Sequence[LoraAdapter],
                        attn: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Per group and per target layer: the mean attention each source received."""
    bs = plan.block_size

    def tokens(m) -> int:
        return -(-m.d_in // bs) + -(-m.d_out // bs)

    out: dict[str, Any] = {}
    for g in plan.groups:
        per_layer: dict[str, dict[str, float]] = {}
        totals = np.zeros(len(plan.source_names))
        for b, a in zip(g.buckets, attn[g.name], strict=True):
            a = np.asarray(a)  # (M, n_b, n_s)
            for i, m in enumerate(b.modules):
                row = a[i].mean(axis=0)  # mean over B query tokens -> (n_s,)
                share: dict[str, float] = {}
                pos = 0
                for src_idx, src_name in m.sources:
                    n = tokens(sources[src_idx].modules[src_name])
                    share[plan.source_names[src_idx]] = float(row[pos:pos + n].sum())
                    totals[src_idx] += share[plan.source_names[src_idx]]
                    pos += n
                per_layer[str(m.layer)] = share
        n_mod = max(len(g.modules), 1)
        out[g.name] = {"per_layer": per_layer,
                       "mean": {s: float(t / n_mod) for s, t in zip(plan.source_names, totals,
                                                                    strict=True)}}
    return out


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the run
def statics_from(cfg: Any, plan: FusionPlan, model_cfg: ModelConfig,
                 steps: int = 1) -> FuseStatics:
    f, r, tr = cfg.fusion, cfg.rdm, cfg.train
    optim = (("lr", float(tr.lr)), ("steps", int(steps)),
             ("warmup_ratio", float(tr.warmup_ratio)),
             ("b1", float(tr.b1)), ("b2", float(tr.b2)), ("eps", float(tr.eps)),
             ("weight_decay", float(tr.weight_decay)))
    return FuseStatics(optim=optim, plan=plan, model=model_cfg, embed_dim=f.embed_dim,
                       num_heads=f.num_heads,
                       max_pos=f.max_pos, mu_gate=float(f.mu_gate), gate=f.gate,
                       lambda_reg=float(r.lambda_reg), mu_target=float(r.mu_target),
                       sigma_target=float(r.sigma_target), num_projections=r.num_projections,
                       activation=r.activation, sort=r.sort, remat=bool(cfg.train.remat))


def run_fusion(cfg: Any, *, dry_run: bool = False, progress: bool = True,
               stop_after: int | None = None, base_params: Any = None) -> FusionResult:
    """Run (or plan, with ``dry_run``) one fusion job described by ``cfg``.

    ``stop_after``: stop after this many optimizer steps in this call (checkpointed, no export):
    used to test interruption and resume. ``base_params``: already-placed base parameters
    (e.g. sharded over a mesh by the caller); loaded from ``cfg.target.model_path`` otherwise.
    """
    shd.maybe_initialize_distributed()  # multi-host: a no-op unless the environment asks
    out_dir = Path(cfg.output_dir) / cfg.task_name
    inp = prepare(cfg)
    if dry_run:
        text = dry_run_text(cfg, inp)
        print(text)
        return FusionResult(out_dir, None, {"plan": inp.plan.report()}, 0, 0, [])

    t0 = time.time()
    tr = cfg.train
    base_dtype = resolve_dtype(tr.base_dtype)
    # The mesh (cfg.mesh) and its logical-axis rules: every array below is placed in its
    # sharding (a 1-device mesh by default on one device).
    mesh = shd.mesh_from_config(cfg.mesh)
    rules = shd.rules_for_batch(shd.rules_from_config(cfg.mesh.rules), mesh, tr.batch_size)
    scan = bool(tr.get("scan_layers", True))
    if base_params is None:
        base_params = from_pretrained(cfg.target.model_path, dtype=base_dtype, mesh=mesh,
                                      rules=rules, stacked=scan).params
    else:
        if scan:  # a caller's list-of-layers params: stacked once here (a copy)
            base_params = stack_layers(base_params)
        base_params = shd.shard_params(
            base_params, logical_axes_tree(inp.model_cfg, stacked=is_stacked(base_params)),
            mesh, rules)
    frozen = {"base": base_params,
              "adapter": shd.put_tree(inp.target.to_jax(jnp.float32), shd.replicated(mesh)),
              "contexts": shd.shard_params(inp.contexts, shd.context_specs(inp.contexts), mesh,
                                           rules)}
    n_batches = num_batches(len(inp.replay), tr.batch_size)
    steps = total_steps(n_batches, tr.epochs, tr.grad_accum, tr.max_steps)
    st = statics_from(cfg, inp.plan, inp.model_cfg, steps)
    optimizer = st.optimizer
    key = jax.random.PRNGKey(cfg.seed)
    init_key, rdm_key = jax.random.split(key)
    f = cfg.fusion
    boxed = init_fusion_params(inp.plan, inp.contexts, key=init_key, embed_dim=f.embed_dim,
                               num_heads=f.num_heads, max_pos=f.max_pos, mu_gate=f.mu_gate,
                               gate=f.gate, alpha_init=f.alpha_init, boxed=True)
    params = nn.unbox(boxed)  # the boxes carry each leaf's logical axes
    param_sh = shd.logical_to_named(shd.fusion_logical_specs(boxed), mesh, rules, shapes=params)
    if cfg.fusion.reuse_from:
        params = reuse_networks(params, Path(cfg.output_dir) / cfg.fusion.reuse_from)
    state_sh = {"params": param_sh, "step": shd.replicated(mesh),
                "opt_state": shd.opt_state_shardings(optimizer, params, param_sh, mesh)}
    state = jax.jit(lambda p: {"params": p, "opt_state": optimizer.init(p),
                               "step": jnp.zeros((), jnp.int32)},
                    out_shardings=state_sh)(shd.put_tree(params, param_sh))

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpointing.Checkpointer(out_dir / "checkpoints", keep=tr.keep_checkpoints)
    meta = {"task_name": cfg.task_name, "steps": steps, "seed": cfg.seed}
    history: list[dict[str, Any]] = []
    if ckpt.latest_step() is not None:
        state, saved_meta = ckpt.restore(state)
        if saved_meta.get("steps") != steps:
            raise ValueError(f"{ckpt.directory}: checkpoint was made for {saved_meta.get('steps')}"
                             f" total steps, this config gives {steps}; use another output_dir")
    start_step = int(state["step"])
    metrics_file = out_dir / "metrics.jsonl"
    if start_step == 0 and metrics_file.exists():
        metrics_file.unlink()

    pad_id = inp.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = inp.tokenizer.eos_token_id or 0
    buckets = length_buckets(cfg.data.cutoff_len, cfg.data.min_bucket)
    stream = micro_batch_stream(inp.replay, batch_size=tr.batch_size, epochs=tr.epochs,
                                seed=cfg.seed, buckets=buckets, pad_id=pad_id,
                                start=start_step * tr.grad_accum)
    compiles_before = _compiles()
    bar = _progress(total=steps, initial=start_step, enabled=progress, desc=cfg.task_name)
    tokens_seen = 0
    t_train = time.time()
    step = start_step
    try:
        with metrics_file.open("a") as mf:
            while step < steps:
                window = [b for _, b in zip(range(tr.grad_accum), stream, strict=False)]
                if not window:
                    break
                batch, weights = stack_window(window, tr.grad_accum, tr.batch_size, pad_id)
                batch = shd.put_tree(batch, shd.batch_sharding(mesh, rules))
                weights = shd.put(weights, shd.replicated(mesh))
                prev = state
                with shd.mesh_context(mesh, rules):
                    state, m = fuse_step(state, frozen, batch, weights, rdm_key, st=st)
                m = jax.device_get(m)
                loss = float(m["loss"])
                if not math.isfinite(loss):
                    raise FuseRunError(
                        f"non-finite loss {loss} at step {step + 1} (lm {float(m['lm_loss'])}, "
                        f"rdm {float(m['rdm'])}); stopped, the last good checkpoint "
                        f"(step {ckpt.latest_step()}) is kept in {ckpt.directory}")
                del prev
                step += 1
                tokens_seen += int(sum(int(b["attention_mask"].sum()) for b in window))
                rec = {"step": step, "loss": loss, "lm_loss": float(m["lm_loss"]),
                       "rdm": float(m["rdm"]), "grad_norm": float(m["grad_norm"]),
                       "alpha": {k: float(v) for k, v in m["alpha"].items()},
                       "time": round(time.time() - t0, 3)}
                history.append(rec)
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lm=f"{rec['lm_loss']:.4f}",
                                rdm=f"{rec['rdm']:.3f}",
                                alpha=",".join(f"{v:.3f}" for v in rec["alpha"].values()))
                if step % tr.checkpoint_every == 0 or step == steps:
                    ckpt.save(step, state, meta)
                if stop_after is not None and step - start_step >= stop_after:
                    ckpt.save(step, state, meta)
                    ckpt.wait()
                    return FusionResult(out_dir, None, {}, step,
                                        _compiles() - compiles_before, history)
    finally:
        bar.close()
        ckpt.wait()
    train_time = time.time() - t_train

    adapter_dir, report = export(cfg, inp, state["params"], frozen, st, out_dir)
    save_networks(state["params"], out_dir)
    report["run"] = {"steps": steps, "compilations": _compiles() - compiles_before,
                     "train_seconds": round(train_time, 3),
                     "steps_this_call": step - start_step,
                     "tokens_this_call": tokens_seen,
                     "tokens_per_second": round(tokens_seen / max(train_time, 1e-9), 2),
                     "resumed_from_step": start_step, "wall_seconds": round(time.time() - t0, 3)}
    _write_json_atomic(out_dir / "fusion_report.json", report)
    return FusionResult(out_dir, adapter_dir, report, steps, _compiles() - compiles_before, history)


NETS_DIR = "transfer_nets"


def save_networks(params: Any, out_dir: Path) -> Path:
    """Keep the trained networks (not the α's) for a later chained task to continue from."""
    import orbax.checkpoint as ocp

    path = (out_dir / NETS_DIR).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, jax.device_get(params["nets"]), force=True)
    return path


def reuse_networks(params: Any, earlier_dir: Path) -> Any:
    """Start from an earlier task's networks (same group names and shapes); fresh α's."""
    import orbax.checkpoint as ocp

    path = (earlier_dir / NETS_DIR).absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no transfer networks to reuse (run the earlier task "
                                f"{earlier_dir.name!r} first)")
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.restore(path)
    nets = dict(params["nets"])
    for g, p in nets.items():
        if g not in saved:
            continue
        old = saved[g]
        if jax.tree.structure(old) != jax.tree.structure(p) or any(
                a.shape != b.shape for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(p),
                                                   strict=True)):
            raise ValueError(f"{path}: network {g!r} has another shape than this task's")
        nets[g] = jax.tree.map(jnp.asarray, old)
    return {**params, "nets": nets}


def _compiles() -> int:
    """Compiled variants of the fuse step so far in this process."""
    try:
        return int(fuse_step._cache_size())
    except AttributeError:  # pragma: no cover - private API
        return -1


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"fuse {desc}",
                unit="step", file=sys.stderr, dynamic_ncols=True)


_run_networks_jit = jax.jit(run_networks, static_argnums=2)


def fused_B_numpy(params: Any, frozen: dict[str, Any], st: FuseStatics
                  ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    new_B, _, attn = _run_networks_jit(params, frozen, st)
    return {k: np.asarray(v) for k, v in new_B.items()}, jax.device_get(attn)


def export(cfg: Any, inp: Inputs, params: Any, frozen: dict[str, Any], st: FuseStatics,
           out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``merged_lora/`` (A unchanged, B + α·ΔB on fused modules) and the report dict."""
    new_B, attn = fused_B_numpy(params, frozen, st)
    fused = inp.target.with_B(new_B)
    fused.config = {**inp.target.config, "inference_mode": True}
    adapter_dir = save_adapter(fused, out_dir / "merged_lora")
    delta_norms = {}
    for name, b in new_B.items():
        b0 = np.asarray(inp.target.modules[name].B, np.float32)
        delta_norms[name] = float(np.linalg.norm(b - b0))
    alpha = {k: float(v) for k, v in jax.device_get(params["alpha"]).items()}
    report = {
        "task_name": cfg.task_name,
        "target_adapter": str(cfg.target.adapter_path),
        "target_model": str(cfg.target.model_path),
        "sources": [{"name": n, "adapter_path": p} for n, p in source_specs(cfg)],
        "template": inp.template,
        "plan": inp.plan.report(),
        "alpha": alpha,
        "alpha_times_delta_B_fro": delta_norms,
        "attention_by_source": attention_by_source(inp.plan, inp.sources, attn),
        "trainable_params": param_count(params),
        "replay": {k: dict(v) for k, v in inp.replay.stats.items()},
    }
    return adapter_dir, report
