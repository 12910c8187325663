"""`run_fusion(cfg)`: the whole HeteroFusion job, from a config (or a `FuseJob`) to a fused
PEFT adapter.

Stages (each fails early with one clear line)::

    adapters -> plan (topology)  -> block contexts      (hfjax.fusion)
    tokenizer + replay JSON      -> padded micro-batches (hfjax.training.data)
    base model (frozen, bf16 ok) -> jitted fuse_step     (hfjax.training.fuse_step)
    the loop (hfjax.training.loop): resume, checkpoints, metrics.jsonl, finite checks
    export: <output_dir>/<task_name>/merged_lora/ + fusion_report.json + metrics.jsonl

The micro-batch stream is the concatenation of the epochs' shuffled orders; optimizer step
``s`` consumes the micro-batches of window ``s`` (`hfjax.training.accumulation`: the original's
per-epoch windows by default, ``train.windows = "continuous"`` for ``[s·accum, (s+1)·accum)``),
each a range of the stream, so a resumed run re-enters the stream where the checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from bridge import LoraAdapter, load_adapter, save_adapter
from hfjax import distributed as dist
from hfjax import machine
from hfjax import run_dir as rd
from hfjax import sharding as shd
from hfjax.atomic import write_json_atomic
from hfjax.config import FuseJob, as_fuse_job, resolve_template, to_fuse_job
from hfjax.errors import RunDiverged
from hfjax.fusion import (
    FusionPlan,
    build_contexts,
    build_plan,
    init_fusion_params,
    param_count,
)
from hfjax.fusion.controls import apply_source_control
from hfjax.fusion.network import nets_of, pack_nets
from hfjax.loading import from_pretrained, load_tokenizer, resolve_dtype
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import frozen_kernel_bits, is_stacked, layer_plan, stack_layers
from hfjax.models.key_tables import logical_axes_tree
from hfjax.sources import load_sources
from hfjax.training.accumulation import describe as describe_windows
from hfjax.training.accumulation import plan_updates
from hfjax.training.data import DataError, ReplaySet, length_buckets, num_batches
from hfjax.training.fingerprint import fingerprint
from hfjax.training.fuse_step import FuseStatics, fuse_step, run_networks
from hfjax.training.fused_export import fused_adapter
from hfjax.training.loop import LoopSettings, run_loop
from hfjax.training.windows import (  # noqa: F401 - micro_batch_stream: re-exported
    Window,
    micro_batch_stream,
    pad_id_of,
    stack_window,
)

ConfigDict = ml_collections.ConfigDict

FuseRunError = RunDiverged  # the old name: a non-finite loss or non-finite parameters


@dataclasses.dataclass
class FusionResult:
    output_dir: Path  # <output_dir>/<task_name>
    adapter_dir: Path | None  # .../merged_lora (None for a dry run)
    report: dict[str, Any]
    steps: int
    compilations: int
    history: list[dict[str, Any]]


# ----------------------------------------------------------------------------- inputs
def _job(cfg: ConfigDict | FuseJob) -> FuseJob:
    """A job as it is (checked when it was made), or a ConfigDict converted and checked."""
    return cfg if isinstance(cfg, FuseJob) else to_fuse_job(cfg)


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


def prepare(cfg: ConfigDict | FuseJob) -> Inputs:
    """Load and check everything that does not need the base weights (fast, for --dry_run)."""
    job = _job(cfg)
    target = load_adapter(job.target.adapter_path)
    # Sources of any family; fused projections (Phi-3) are split here.
    opts, sources = load_sources([dataclasses.asdict(s) for s in job.sources], target)
    names = [o.name for o in opts]
    plan = build_plan(target, sources, job.plan, source_names=names)
    # Controls (zero / noise / mismatch): is the gain from the sources or from replay alone?
    contexts = apply_source_control(build_contexts(plan, target, sources), plan, job.control,
                                    seed=job.seed)
    model_cfg = ModelConfig.from_hf(job.target.model_path,
                                    source=str(Path(job.target.model_path) / "config.json"))
    tokenizer = load_tokenizer(job.target.model_path)
    template = resolve_template(job.target.template, model_cfg.model_type)
    replay = ReplaySet.load(list(job.data.datasets), job.data.data_root, tokenizer, template,
                            job.data.cutoff_len, roles=job.data.parsed_roles(), seed=job.seed)
    if len(replay) == 0:
        raise DataError(f"{job.data.data_root}: the replay set is empty")
    from hfjax.fusion.network import _check_contexts  # the real run's check, for --dry_run too

    _check_contexts(plan, contexts, job.net.max_pos)
    return Inputs(target, sources, names, plan, contexts, model_cfg, replay, tokenizer, template)


# ----------------------------------------------------------------------------- reporting
def dry_run_text(cfg: ConfigDict | FuseJob, inp: Inputs) -> str:
    from hfjax.fusion import net_param_count

    job = _job(cfg)
    f, tr = job.net, job.train
    lines = [inp.plan.describe(), "", "replay data:", inp.replay.summary(), ""]
    n_batches = num_batches(len(inp.replay), job.train.batch_size)
    tr = job.train
    ws, _ = plan_updates(n_batches, tr.grad_accum, tr.epochs, tr.windows, tr.max_steps)
    steps = len(ws)
    per_group = {g.name: net_param_count(inp.plan.block_size, g.rank, f.embed_dim, f.num_heads,
                                         f.max_pos, f.gate) for g in inp.plan.groups}
    total = sum(per_group.values()) + len(per_group)
    lines.append("transfer networks (one per group):")
    for g, n in per_group.items():
        lines.append(f"  {g:<16} {n / 1e6:10.2f} M params")
    lines.append(f"  total trainable: {total / 1e6:.2f} M (+ AdamW moments: "
                 f"{3 * total * 4 / 2**30:.2f} GiB for params + 2 moments, float32)")
    lines.append(f"optimizer steps: {steps} (batches/epoch {n_batches}, epochs "
                 f"{tr.epochs}, accum {tr.grad_accum})")
    lines.append("  " + describe_windows(ws, tr.grad_accum, n_batches, tr.epochs, tr.windows))
    lines.append(layer_plan(inp.model_cfg, inp.target.modules, stacked=_scan_layers(job)))
    try:
        from hfjax.memory import memory_plan_text

        lines += ["", memory_plan_text(job, inp.model_cfg, inp.plan)]
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
                row = a[i].mean(axis=0)  # mean over the decoded (query) tokens -> (n_s,)
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


# ----------------------------------------------------------------------------- the run
def _scan_layers(job: FuseJob) -> bool:
    """Run the decoder layers as one scan (``train.scan_layers``). Multi-host runs keep the
    per-layer loop: its loader reads only each process's shards tensor by tensor."""
    return bool(job.train.scan_layers) and not dist.is_multiprocess()


def statics_from(cfg: ConfigDict | FuseJob, plan: FusionPlan, model_cfg: ModelConfig,
                 steps: int = 1) -> FuseStatics:
    """The fuse step's static argument: the job's network, RDM and optimizer settings (a
    ConfigDict is read unchecked: only its settings matter here, not its paths)."""
    from hfjax.config.jobs import fuse_job_from

    job = cfg if isinstance(cfg, FuseJob) else fuse_job_from(cfg)[0]
    return FuseStatics(plan=plan, model=model_cfg, net=job.net, rdm=job.rdm, optim=job.optim,
                       steps=int(steps), remat=bool(job.train.remat))


def run_fusion(cfg: ConfigDict | FuseJob, *, dry_run: bool = False, progress: bool = True,
               stop_after: int | None = None, base_params: Any = None,
               restart: bool = False) -> FusionResult:
    """Run (or plan, with ``dry_run``) one fusion job described by ``cfg``.

    ``cfg`` is one task's fuse ConfigDict (converted by `hfjax.config.to_fuse_job`) or a
    `FuseJob`; either is checked on entry (a dry run does not require the paths to exist).

    ``stop_after``: stop after this many optimizer steps in this call (checkpointed, no export):
    used to test interruption and resume. ``restart``: delete the output directory's
    checkpoints and metrics and start from step 0 (a mismatched checkpoint is refused
    otherwise). ``base_params``: already-placed base parameters
    (e.g. sharded over a mesh by the caller); loaded from ``target.model_path`` otherwise.
    """
    job = as_fuse_job(cfg, check_paths=not dry_run)
    shd.maybe_initialize_distributed()  # multi-host: a no-op unless the environment asks
    rd.check_task_name(job.task_name)
    out_dir = rd.inside(job.output_dir, job.task_name)
    if dry_run:
        inp = prepare(job)
        text = dry_run_text(job, inp)
        print(text)
        return FusionResult(out_dir, None, {"plan": inp.plan.report()}, 0, 0, [])
    rd.check_writable(job.output_dir)  # before any heavy work
    earlier = job.target.from_task
    if earlier and not rd.is_complete(rd.inside(job.output_dir, earlier)):
        raise rd.OutputPathError(f"{rd.inside(job.output_dir, earlier)}: task {earlier!r} has "
                                 f"not finished (no {rd.COMPLETE_FILE}); run it first")
    inp = prepare(job)
    if not dist.is_primary():
        return _run_fusion(job, inp, out_dir, progress=progress, stop_after=stop_after,
                           base_params=base_params, restart=restart)
    with rd.TaskLock(out_dir):
        rd.clean_partial_exports(out_dir)
        return _run_fusion(job, inp, out_dir, progress=progress, stop_after=stop_after,
                           base_params=base_params, restart=restart)


def fuse_identity(job: FuseJob, steps: int) -> dict[str, Any]:
    """Everything that determines a fuse run's result (`hfjax.training.fingerprint`)."""
    from hfjax.training.data import resolve_dataset

    inputs: dict[str, Any] = {"target.adapter": job.target.adapter_path,
                              "target.model_config": Path(job.target.model_path) / "config.json"}
    for s in job.sources:
        inputs[f"source.{s.name}"] = s.adapter_path
    for name in job.data.datasets:
        inputs[f"data.{name}"] = resolve_dataset(name, job.data.data_root)
    # The step's state layout (networks packed per cluster) is part of what a checkpoint
    # holds: a run written with another layout is refused, not misread.
    return fingerprint(job.to_dict(), inputs, steps=steps, state_layout=STATE_LAYOUT)


def _run_fusion(job: FuseJob, inp: Inputs, out_dir: Path, *, progress: bool,
                stop_after: int | None, base_params: Any, restart: bool) -> FusionResult:
    t0 = time.time()
    tr = job.train
    base_dtype = resolve_dtype(tr.base_dtype)
    # The mesh (job.mesh) and its logical-axis rules: every array below is placed in its
    # sharding (a 1-device mesh by default on one device).
    mesh = shd.mesh_from_config(job.mesh)
    rules = shd.rules_for_batch(shd.rules_from_config(job.mesh.rules), mesh, tr.batch_size)
    scan = _scan_layers(job)
    if base_params is None:
        base_params = from_pretrained(job.target.model_path, dtype=base_dtype, mesh=mesh,
                                      rules=rules, stacked=scan).params
        # CPU, bf16: the step up-casts one layer at a time (we own these arrays: consumed)
        base_params = frozen_kernel_bits(base_params, consume=True)
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
    ws, schedule_len = plan_updates(n_batches, tr.grad_accum, tr.epochs, tr.windows,
                                    tr.max_steps)
    steps = len(ws)  # may be 0 (original windows, fewer micro-batches than accum): no update
    st = statics_from(job, inp.plan, inp.model_cfg, schedule_len)
    optimizer = st.optimizer
    key = jax.random.PRNGKey(job.seed)
    init_key, rdm_key = jax.random.split(key)
    f = job.net
    boxed = init_fusion_params(inp.plan, inp.contexts, key=init_key, embed_dim=f.embed_dim,
                               num_heads=f.num_heads, max_pos=f.max_pos, mu_gate=f.mu_gate,
                               gate=f.gate, alpha_init=f.alpha_init, boxed=True)
    params = nn.unbox(boxed)  # the boxes carry each leaf's logical axes
    if job.reuse_from:
        params = reuse_networks(params, Path(job.output_dir) / job.reuse_from)
    # The step keeps same-shaped groups' networks stacked (pack_nets: fewer, larger arrays).
    params = {"clusters": pack_nets(params["nets"], inp.plan), "alpha": params["alpha"]}
    param_sh = shd.logical_to_named(
        shd.packed_specs(shd.fusion_logical_specs(boxed), inp.plan), mesh, rules, shapes=params)
    state_sh = {"params": param_sh, "step": shd.replicated(mesh),
                "opt_state": shd.opt_state_shardings(optimizer, params, param_sh, mesh)}
    state = jax.jit(lambda p: {"params": p, "opt_state": optimizer.init(p),
                               "step": jnp.zeros((), jnp.int32)},
                    out_shardings=state_sh)(shd.put_tree(params, param_sh))
    del boxed, params
    machine.release_free_heap()  # setup's freed host copies are not the step's (§7)

    settings = LoopSettings(total_steps=steps, log_every=tr.log_every,
                            checkpoint_every=tr.checkpoint_every,
                            keep_checkpoints=tr.keep_checkpoints, stop_after=stop_after,
                            restart=restart, desc=f"fuse {job.task_name}")
    identity = fuse_identity(job, steps)
    pad_id = pad_id_of(inp.tokenizer)
    buckets = length_buckets(job.data.cutoff_len, job.data.min_bucket)
    batch_sh, rep_sh = shd.batch_sharding(mesh, rules), shd.replicated(mesh)

    def batches(start: int) -> Iterator[Window]:
        if start >= steps:
            return
        stream = micro_batch_stream(inp.replay, batch_size=tr.batch_size, epochs=tr.epochs,
                                    seed=job.seed, buckets=buckets, pad_id=pad_id,
                                    start=ws[start].start)
        for w in ws[start:]:
            items = [b for _, b in zip(range(len(w)), stream, strict=False)]
            if not items:
                return
            # Pad to one shape (a window may hold more than accum micro-batches: the
            # original's epoch leftovers); each micro-batch loss is scaled by the window's.
            batch, weights = stack_window(items, max(tr.grad_accum, len(items)),
                                          tr.batch_size, pad_id)
            weights = weights * np.float32(w.scale)
            tokens = int(sum(int(b["attention_mask"].sum()) for b in items))
            yield Window(shd.put_tree(batch, batch_sh), shd.put(weights, rep_sh), tokens)

    def step_fn(state: Any, w: Window) -> tuple[Any, Any]:
        with shd.mesh_context(mesh, rules):
            return fuse_step(state, frozen, w.batch, w.weights, rdm_key, st=st)

    compiles_before = _compiles()
    res = run_loop(step_fn, state, batches, settings, out_dir, identity,
                   on_metrics=_fuse_row, progress=progress)
    state = res.state
    if stop_after is not None and res.step - res.start_step >= stop_after:
        return FusionResult(out_dir, None, {}, res.step, _compiles() - compiles_before,
                            res.history)

    if dist.is_primary():
        rd.clear_complete(out_dir)  # the outputs are rewritten below; the marker comes last
    adapter_dir, report = export(job, inp, state["params"], frozen, st, out_dir)
    save_networks(state["params"], out_dir, inp.plan)
    report["run"] = {"steps": steps, "compilations": _compiles() - compiles_before,
                     **res.timings(), "wall_seconds": round(time.time() - t0, 3)}
    report["config"] = job.to_dict()  # the resolved config of this run
    if dist.is_primary():
        write_json_atomic(out_dir / "fusion_report.json", report, default=float)
        outputs = ["merged_lora", NETS_DIR, "fusion_report.json"]
        outputs += ["metrics.jsonl"] if (out_dir / "metrics.jsonl").exists() else []
        rd.mark_complete(out_dir, outputs, {"task_name": job.task_name})
    dist.barrier("fusion-outputs")  # the others return once process 0's files are written
    return FusionResult(out_dir, adapter_dir, report, steps, _compiles() - compiles_before,
                        res.history)


NETS_DIR = "transfer_nets"
STATE_LAYOUT = "clusters-2"  # pack_nets' layout of the step's networks and optimizer state


def save_networks(params: Any, out_dir: Path, plan: FusionPlan) -> Path:
    """Keep the trained networks (not the α's; one tree per group, whatever layout the step
    kept) for a later chained task to continue from."""
    import orbax.checkpoint as ocp

    path = (out_dir / NETS_DIR).absolute()
    tree = {k: v for k, v in params.items() if k != "alpha"}
    # host numpy (a collective on multi-host), then one tree per group
    nets = nets_of(dist.gather_to_host(tree), plan)
    with ocp.StandardCheckpointer() as ckptr:  # every process calls it; orbax picks a writer
        ckptr.save(path, nets, force=True)
    return path


def reuse_networks(params: Any, earlier_dir: Path) -> Any:
    """Start from an earlier task's networks (same group names and shapes); fresh α's."""
    import orbax.checkpoint as ocp

    path = (earlier_dir / NETS_DIR).absolute()
    if not path.exists():
        raise rd.OutputPathError(f"{path}: no transfer networks to reuse (run the earlier task "
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
            raise DataError(f"{path}: network {g!r} has another shape than this task's")
        nets[g] = jax.tree.map(jnp.asarray, old)
    return {**params, "nets": nets}


def _fuse_row(step: int, m: Mapping[str, Any]) -> dict[str, Any]:
    """One metrics row: the losses, the gradient norm and every α."""
    return {"loss": float(m["loss"]), "lm_loss": float(m["lm_loss"]), "rdm": float(m["rdm"]),
            "grad_norm": float(m["grad_norm"]),
            "alpha": {k: float(v) for k, v in m["alpha"].items()}}


def _compiles() -> int:
    """Compiled variants of the fuse step so far in this process."""
    try:
        return int(fuse_step._cache_size())
    except AttributeError:  # pragma: no cover - private API
        return -1


_run_networks_jit = jax.jit(run_networks, static_argnums=2)


def fused_factors_numpy(params: Any, frozen: dict[str, Any], st: FuseStatics
                        ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """The patched factors ``{"B"?: {module: B'}, "A"?: {module: A'}}`` (numpy float32, per
    ``st.plan.update_mode``) and the attention per group."""
    factors, _, attn = _run_networks_jit(params, frozen, st)
    # Multi-host, the outputs are sharded across processes: all-gather them to every host.
    factors, attn = dist.gather_to_host((factors, attn))
    return {f: {k: np.asarray(v) for k, v in mods.items()} for f, mods in factors.items()}, attn


def _with_A(adapter: LoraAdapter, new_A: Mapping[str, np.ndarray]) -> LoraAdapter:
    """A copy whose listed modules get new A matrices, written in float32 (fused modules)."""
    mods = dict(adapter.modules)
    for name, a in new_A.items():
        if a.shape != mods[name].A.shape:
            raise ValueError(f"{name}: new A has shape {a.shape}, expected {mods[name].A.shape}")
        mods[name] = dataclasses.replace(mods[name], A=np.asarray(a, np.float32))
    return LoraAdapter(config=dict(adapter.config), modules=mods, path=None)


def export(job: ConfigDict | FuseJob, inp: Inputs, params: Any, frozen: dict[str, Any],
           st: FuseStatics, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write ``merged_lora/`` (the factors ``update_mode`` patches: B + α·ΔB and/or
    A + α·ΔA on fused modules; the rest unchanged) and the report dict."""
    job = _job(job)
    factors, attn = fused_factors_numpy(params, frozen, st)
    new_B, new_A = factors.get("B", {}), factors.get("A", {})
    fused = _with_A(fused_adapter(inp.target, new_B, job.export_dtype), new_A)
    adapter_dir = out_dir / "merged_lora"
    if dist.is_primary():  # one writer (the factors are already gathered on every process)
        adapter_dir = save_adapter(fused, adapter_dir)
    delta_norms = {}
    for name, b in new_B.items():
        b0 = np.asarray(inp.target.modules[name].B, np.float32)
        delta_norms[name] = float(np.linalg.norm(b - b0))
    delta_A_norms = {name: float(np.linalg.norm(a - np.asarray(inp.target.modules[name].A,
                                                                  np.float32)))
                     for name, a in new_A.items()}
    alpha = {k: float(v) for k, v in jax.device_get(params["alpha"]).items()}
    report = {
        "task_name": job.task_name,
        "target_adapter": str(job.target.adapter_path),
        "target_model": str(job.target.model_path),
        "sources": [{"name": s.name, "adapter_path": s.adapter_path} for s in job.sources],
        "template": inp.template,
        "source_control": job.control,  # "none" unless this run is a control
        "plan": inp.plan.report(),
        "alpha": alpha,
        "export_dtype": {"option": job.export_dtype,
                         "fused_modules": sorted({str(fused.modules[n].B.dtype) for n in new_B})},
        "update_mode": inp.plan.update_mode,
        "alpha_times_delta_B_fro": delta_norms,
        "alpha_times_delta_A_fro": delta_A_norms,
        "attention_by_source": attention_by_source(inp.plan, inp.sources, attn),
        "trainable_params": param_count(params),
        "replay": {k: dict(v) for k, v in inp.replay.stats.items()},
    }
    return adapter_dir, report
