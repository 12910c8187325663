"""One-command accelerator check (``bash scripts/gpu_check.sh``; ``--small`` on a CPU).

Prints one block, section by section::

    device       kind, platform, count, the peak table row used for the FLOP/s shares
    bench        the paper-shape fused step (`hfjax.bench`, config "paper"; "small" with
                 --small): compile time, step / network / LM times, network and LM FLOP/s as
                 a share of the device's bf16 and f32 peak (`PEAK_TFLOPS`; "unknown" otherwise)
    1B step      one fuse step of a Llama-3.2-1B-shaped base in bf16 (random weights, r=8
                 all-linear target + one source, the paper's fusion settings): compile and
                 step time, measured ``peak_bytes_in_use`` next to `hfjax.memory`'s plan
    cache        the same small executable compiled in two fresh processes sharing a
                 persistent cache dir (`hfjax.compile_cache`): miss, then hit
    sharded      the 1B (or small) step over a mesh of every visible device (fsdp), and its
                 loss against the unsharded step's

``--small`` (automatic when no GPU is visible) swaps the 1B and paper shapes for tiny ones
so the whole check runs in about two minutes on two CPU cores; it exercises the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

GiB = float(1 << 30)

# Dense (no sparsity) peak TFLOP/s per device kind: (bf16 tensor core, f32 non-tensor), from
# the vendors' data sheets. Matched in order against ``device_kind`` (word boundaries).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 66.9),
    ("H100 PCIe", 756.0, 51.2),
    ("H100", 989.4, 66.9),
    ("A100", 312.0, 19.5),
    ("L40S", 362.1, 91.6),
    ("L4", 121.0, 30.3),
    ("A10", 125.0, 31.2),
)

# Llama-3.2-1B (hidden 2048, 16 layers, GQA 32/8 heads, vocab 128256, tied embeddings).
LLAMA32_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048,
                  intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                  max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
TINY = dict(LLAMA32_1B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)


def peak_for(kind: str) -> tuple[str, float, float] | None:
    """``(table name, bf16, f32)`` peak TFLOP/s of a device kind, or None (unknown)."""
    for name, bf16, f32 in PEAK_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", kind):
            return name, bf16, f32
    return None


def _share(flops_per_s: float, peak: tuple[str, float, float] | None) -> str:
    if peak is None:
        return "share of peak unknown"
    return (f"{100 * flops_per_s / (peak[1] * 1e12):.1f}% of bf16 peak, "
            f"{100 * flops_per_s / (peak[2] * 1e12):.1f}% of f32 peak")


def _rate(flops_per_s: float) -> str:
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.2f} TFLOP/s"
    return f"{flops_per_s / 1e9:.2f} GFLOP/s"


def _median_time(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------- sections
def device_section() -> tuple[list[str], Any]:
    import jax

    devs = jax.devices()
    kind = devs[0].device_kind
    peak = peak_for(kind)
    row = (f"{peak[0]}: bf16 {peak[1]:g}, f32 {peak[2]:g} TFLOP/s (dense)" if peak
           else "unknown (no peak in the table)")
    return [f"device: {kind} x {len(devs)} ({devs[0].platform}, jax {jax.__version__}); "
            f"peak: {row}"], peak


def bench_section(small: bool, peak: Any, tmp: Path) -> list[str]:
    import dataclasses

    from hfjax import bench

    c = bench.CONFIGS["small" if small else "paper"]
    c = dataclasses.replace(c, repeats=3)
    fx = tmp / "bench"
    bench.prepare_fixture(c, fx)
    jx = bench.JaxSide(c, fx)
    jx.step()  # first call
    jx.network()
    jx.lm()
    t = {w: _median_time(getattr(jx, w), c.repeats) for w in ("step", "network", "lm")}
    f_net, f_lm = bench.network_flops(c), bench.lm_flops(c)
    lines = [f"bench ({c.name}: {c.describe()}):",
             f"  compile: step {jx.compile_s:.1f} s, network {jx.net_compile_s:.1f} s, "
             f"lm {jx.lm_compile_s:.1f} s",
             f"  step (1 update, accum {c.accum}) {t['step'] * 1e3:.1f} ms",
             f"  network fwd+bwd+RDM {t['network'] * 1e3:.1f} ms = "
             f"{_rate(f_net / t['network'])} ({_share(f_net / t['network'], peak)})",
             f"  LM (1 micro-batch)  {t['lm'] * 1e3:.1f} ms = "
             f"{_rate(f_lm / t['lm'])} ({_share(f_lm / t['lm'], peak)})"]
    return lines


def _fuse_job(small: bool) -> dict[str, Any]:
    """Everything one fuse step needs, for a 1B-shaped (or tiny) bf16 Llama."""
    import jax
    import jax.numpy as jnp

    from hfjax.configs.fuse import get_config
    from hfjax.fusion import build_contexts, build_plan, init_fusion_params
    from hfjax.loading import init_params
    from hfjax.models.config import ModelConfig
    from hfjax.testing.models import ALL_LINEAR, random_lora
    from hfjax.training.fuse_loop import statics_from

    cfg = get_config()
    cfg.train.base_dtype = "bfloat16"
    if small:
        cfg.fusion.block_size, cfg.fusion.embed_dim, cfg.fusion.num_heads = 64, 64, 4
        cfg.fusion.max_pos = 64
        cfg.rdm.num_projections = 64
        cfg.data.cutoff_len = 64
        cfg.train.grad_accum = 2
    model_cfg = ModelConfig(**(TINY if small else LLAMA32_1B))
    # All-linear LoRAs as in the paper; --small fuses q_proj only (one bucket: one short
    # CPU compile instead of one unrolled network per module shape).
    mods = ("q_proj",) if small else ALL_LINEAR
    target = random_lora(model_cfg, r=8, alpha=16, seed=1, target_modules=mods)
    source = random_lora(model_cfg, r=8, alpha=16, seed=2, target_modules=mods)
    plan = build_plan(target, [source], block_size=cfg.fusion.block_size,
                      transfer_ratio=cfg.fusion.transfer_ratio, source_names=["source"])
    contexts = build_contexts(plan, target, [source])
    st = statics_from(cfg, plan, model_cfg, steps=100)
    f = cfg.fusion
    params = init_fusion_params(plan, contexts, key=jax.random.PRNGKey(0),
                                embed_dim=f.embed_dim, num_heads=f.num_heads, max_pos=f.max_pos,
                                mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init)
    base = init_params(model_cfg, jax.random.PRNGKey(1), dtype=jnp.bfloat16)
    rng = np.random.default_rng(3)
    A, B, L = cfg.train.grad_accum, cfg.train.batch_size, cfg.data.cutoff_len
    ids = rng.integers(3, model_cfg.vocab_size, size=(A, B, L)).astype(np.int32)
    labels = ids.copy()
    labels[..., : L // 2] = -100
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    return {"cfg": cfg, "model_cfg": model_cfg, "plan": plan, "contexts": contexts, "st": st,
            "params": params, "base": base, "adapter": target.to_jax(jnp.float32),
            "batch": batch, "weights": np.ones(A, np.float32)}


def _fresh_state(job: dict[str, Any]) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    p = jax.tree.map(jnp.copy, job["params"])
    return {"params": p, "opt_state": job["st"].optimizer.init(p),
            "step": jnp.zeros((), jnp.int32)}


def step_section(job: dict[str, Any], small: bool) -> tuple[list[str], float]:
    import jax
    import jax.numpy as jnp

    from hfjax.memory import memory_plan
    from hfjax.training import fuse_step as fs

    frozen = {"base": job["base"], "adapter": job["adapter"],
              "contexts": jax.tree.map(jnp.asarray, job["contexts"])}
    batch = jax.tree.map(jnp.asarray, job["batch"])
    weights, key = jnp.asarray(job["weights"]), jax.random.PRNGKey(5)
    state = _fresh_state(job)
    t0 = time.perf_counter()
    step = fs.fuse_step.lower(state, frozen, batch, weights, key, st=job["st"]).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, frozen, batch, weights, key)
    loss = float(m["loss"])
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    state, m2 = step(state, frozen, batch, weights, key)
    jax.block_until_ready(state)
    step_s = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    cfg, model_cfg = job["cfg"], job["model_cfg"]
    planned = memory_plan(cfg, model_cfg, job["plan"], {"data": 1, "fsdp": 1, "tensor": 1})
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(job["base"]))
    A, B, L = np.shape(job["batch"]["input_ids"])
    what = "tiny Llama (--small)" if small else "Llama-3.2-1B shapes"
    lines = [f"fuse step, {what}: {n_base / 1e6:.1f} M base params bf16, "
             f"{len(job['plan'].fused_modules)} fused modules, micro-batch {B}x{L}, accum {A}",
             f"  compile {compile_s:.1f} s, step {step_s * 1e3:.1f} ms, loss {loss:.4f} -> "
             f"{float(m2['loss']):.4f}"]
    if "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"]
        lines.append(f"  peak device memory {peak / GiB:.2f} GiB measured, "
                     f"{planned['total'] / GiB:.2f} GiB planned (hfjax.memory; "
                     f"measured/planned {peak / planned['total']:.2f})")
    else:
        lines.append(f"  peak device memory: not reported by this device; planned "
                     f"{planned['total'] / GiB:.3f} GiB (hfjax.memory)")
    del state
    return lines, loss


def sharded_section(job: dict[str, Any], loss_1: float) -> list[str]:
    import jax

    from hfjax import sharding as shd
    from hfjax.models.key_tables import logical_axes_tree
    from hfjax.training import fuse_step as fs

    n = jax.device_count()
    cfg = job["cfg"]
    mesh = shd.make_mesh(data=1, fsdp=n, tensor=1)
    rules = shd.rules_for_batch(shd.rules_from_config(cfg.mesh.rules), mesh,
                                cfg.train.batch_size)
    st = job["st"]
    from flax import linen as nn

    from hfjax.fusion import init_fusion_params

    f = cfg.fusion
    boxed = init_fusion_params(job["plan"], job["contexts"], key=jax.random.PRNGKey(0),
                               embed_dim=f.embed_dim, num_heads=f.num_heads, max_pos=f.max_pos,
                               mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init,
                               boxed=True)
    param_sh = shd.logical_to_named(shd.fusion_logical_specs(boxed), mesh, rules,
                                    shapes=nn.unbox(boxed))
    state = _fresh_state(job)
    state_sh = {"params": param_sh, "step": shd.replicated(mesh),
                "opt_state": shd.opt_state_shardings(st.optimizer, state["params"], param_sh,
                                                     mesh)}
    state = shd.put_tree(state, state_sh)
    frozen = {"base": shd.shard_params(job["base"], logical_axes_tree(job["model_cfg"]), mesh,
                                       rules),
              "adapter": shd.put_tree(job["adapter"], shd.replicated(mesh)),
              "contexts": shd.shard_params(job["contexts"], shd.context_specs(job["contexts"]),
                                           mesh, rules)}
    batch = shd.put_tree(job["batch"], shd.batch_sharding(mesh, rules))
    weights = shd.put(job["weights"], shd.replicated(mesh))
    key = jax.random.PRNGKey(5)
    with shd.mesh_context(mesh, rules):
        t0 = time.perf_counter()
        step = fs.fuse_step.lower(state, frozen, batch, weights, key, st=st).compile()
        compile_s = time.perf_counter() - t0
        state, m = step(state, frozen, batch, weights, key)
        loss = float(m["loss"])
        t0 = time.perf_counter()
        state, _ = step(state, frozen, batch, weights, key)
        jax.block_until_ready(state)
        step_s = time.perf_counter() - t0
    per_dev = shd.bytes_per_device(frozen["base"])
    return [f"sharded step over {n} device(s) (mesh fsdp={n}): compile {compile_s:.1f} s, "
            f"step {step_s * 1e3:.1f} ms, base {per_dev / GiB:.3f} GiB per device, "
            f"loss {loss:.4f} (|diff| vs unsharded {abs(loss - loss_1):.1e})"]


def cache_probe(cache: str) -> None:
    """Child side of the cache section: compile one small jitted LM gradient, print JSON."""
    import jax
    import jax.numpy as jnp

    from hfjax import compile_cache
    from hfjax.loading import init_params
    from hfjax.models.config import ModelConfig
    from hfjax.training.objective import lm_loss

    assert compile_cache.enable({compile_cache.ENV: cache}, min_compile_secs=0.0)
    hits: list[str] = []
    jax.monitoring.register_event_listener(
        lambda name, **_: hits.append(name) if name.endswith("cache_hits") else None)
    mc = ModelConfig(**TINY)
    params = init_params(mc, jax.random.PRNGKey(0))
    ids = jnp.ones((1, 32), jnp.int32)
    mb = {"input_ids": ids, "attention_mask": ids, "labels": ids}
    t0 = time.perf_counter()
    jax.jit(jax.grad(lambda p: lm_loss(p, mc, mb, None))).lower(params).compile()
    print(json.dumps({"compile_s": time.perf_counter() - t0, "hits": len(hits)}))


def cache_section(tmp: Path) -> list[str]:
    cache = tmp / "xla_cache"
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "hfjax.gpu_check", "--cache-probe",
                              str(cache)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                 [str(Path(__file__).resolve().parent.parent),
                                  os.environ.get("PYTHONPATH", "")])})
        if out.returncode != 0:
            return [f"compile cache: probe failed (rc {out.returncode}): "
                    f"{out.stderr.strip().splitlines()[-1:]}"]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    files = sum(1 for _ in cache.rglob("*") if _.is_file())
    verdict = "HIT" if runs[1]["hits"] > 0 and runs[0]["hits"] == 0 else "NO hit"
    return [f"compile cache (persistent, {files} file(s)): first process compiles in "
            f"{runs[0]['compile_s']:.2f} s ({runs[0]['hits']} hits), second in "
            f"{runs[1]['compile_s']:.2f} s ({runs[1]['hits']} hits): {verdict}"]


# ----------------------------------------------------------------------------- main
def _has_gpu() -> bool:
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true",
                   help="tiny shapes (the default when no GPU is visible)")
    p.add_argument("--cache-probe", help=argparse.SUPPRESS)
    args = p.parse_args(list(argv) if argv is not None else None)
    if args.cache_probe:
        cache_probe(args.cache_probe)
        return 0
    t_all = time.perf_counter()
    small = args.small or not _has_gpu()
    lines, peak = device_section()
    with tempfile.TemporaryDirectory(prefix="hfjax_gpu_check_") as tmp:
        job = _fuse_job(small)
        step_lines, loss_1 = step_section(job, small)  # first: its peak is the process's peak
        lines += step_lines
        lines += sharded_section(job, loss_1)
        del job
        lines += bench_section(small, peak, Path(tmp))
        lines += cache_section(Path(tmp))
    lines.append(f"gpu_check {'--small ' if small else ''}done in "
                 f"{time.perf_counter() - t_all:.0f} s")
    print("\n".join(["=" * 78, *lines, "=" * 78]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
