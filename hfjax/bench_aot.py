"""Ahead-of-time compile benchmark of `fuse_step` on abstract shapes (nothing is allocated).

::

    python scripts/bench.py --aot            # paper setting: 1 and 5 sources, 8..80 layers,
                                             # remat off / on
    python scripts/bench.py --aot --quick    # a tiny model: seconds on a laptop CPU
    python scripts/bench.py --aot --demo --remat off   # the embedded demo's fuse step
    python -m hfjax.bench_aot --layers 8,32 --sources 1 --remat off

Each row lowers and compiles the jitted step with `jax.ShapeDtypeStruct` inputs (the base
weights, the target adapter, the block contexts, the network state, one accumulation window)
and prints: lowering and compile seconds, the number of kernels in the compiled HLO (see
`count_kernels`), XLA's ``memory_analysis()`` (temp and argument bytes) and the memory
planner's figures for the same setting (`hfjax.memory.memory_plan`: its transient part and
its total), all per device on the backend that compiled it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

MiB = float(1 << 20)
# Opcodes that launch no work of their own (bookkeeping and control flow).
_TRIVIAL_OPS = frozenset({"parameter", "get-tuple-element", "tuple", "constant", "bitcast",
                          "while", "conditional", "call", "after-all", "opt-barrier",
                          "partition-id", "replica-id"})
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_SUB_RE = re.compile(r"(?:calls|to_apply|comparator)=%?([\w.\-]+)")


def count_kernels(hlo_text: str) -> int:
    """Kernels in a compiled HLO module: instructions that do work (fusions, dots, custom
    calls, copies, ...) in the entry computation and in the control-flow bodies (while,
    conditional) it runs, not counting the instructions inside a fusion or a reducer."""
    comps: dict[str, list[str]] = {}
    current: str | None = None
    nested: set[str] = set()
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_RE.match(line)
            if m and "=" not in line.split("{")[0].split("(")[0]:
                current = m.group(2)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR_RE.match(line)
        if m:
            comps[current].append(m.group(1))
            nested.update(_SUB_RE.findall(line))
    return sum(1 for name, ops in comps.items() if name not in nested
               for op in ops if op not in _TRIVIAL_OPS)


@dataclasses.dataclass(frozen=True)
class AotCase:
    """One row of the table: the model's depth, the sources, remat and the base dtype."""

    layers: int  # target decoder layers (the paper's Llama-3.1-8B has 32)
    sources: int  # number of source LoRAs (Qwen2.5-7B-shaped, r=8 all-linear)
    remat: bool  # rematerialise each decoder layer in the backward pass
    base_dtype: str = "bfloat16"  # dtype of the frozen base weights
    quick: bool = False  # a tiny model and fusion block instead of the paper setting
    scan: bool = True  # stacked base layers run as one lax.scan (False: the unrolled loop)
    demo: bool = False  # the embedded demo's fuse step (its zoo's shapes and fuse settings)


_QUICK_TARGET = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16)
_QUICK_SOURCE = dict(model_type="qwen2", vocab_size=640, hidden_size=48, intermediate_size=96,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                     head_dim=12, qkv_bias=True)


def _shape_only_lora(model: dict[str, Any], r: int, modules: tuple[str, ...] | None) -> Any:
    """`hfjax.memory._shape_only_lora`, restricted to ``modules`` (all linears if None)."""
    from bridge import LoraAdapter, make_adapter_config
    from hfjax import memory

    full = memory._shape_only_lora(model, r)
    if modules is None:
        return full
    mods = {n: m for n, m in full.modules.items() if n.rsplit(".", 1)[-1] in modules}
    return LoraAdapter(config=make_adapter_config(r=r, lora_alpha=2 * r,
                                                  target_modules=sorted(modules)), modules=mods)


def case_setting(case: AotCase) -> tuple[Any, Any, Any]:
    """``(cfg, model_cfg, plan)`` for a case (the paper setting at ``case.layers`` layers)."""
    from hfjax import memory
    from hfjax.configs.fuse import get_config
    from hfjax.fusion import build_plan
    from hfjax.models.config import ModelConfig

    cfg = get_config()
    if case.demo:
        return _demo_setting(case)
    if case.quick:
        tgt, src = dict(_QUICK_TARGET), dict(_QUICK_SOURCE)
        cfg.fusion.block_size, cfg.fusion.embed_dim, cfg.fusion.num_heads = 16, 32, 4
        cfg.fusion.max_pos, cfg.rdm.num_projections = 64, 16
        cfg.data.cutoff_len, cfg.train.grad_accum = 64, 2
    else:
        tgt, src = dict(memory.LLAMA31_8B), dict(memory.QWEN25_7B)
    tgt["num_hidden_layers"] = case.layers
    cfg.train.remat = case.remat
    cfg.train.base_dtype = case.base_dtype
    cfg.train.scan_layers = case.scan
    for k in ("data", "fsdp", "tensor"):
        if k in cfg.mesh:
            setattr(cfg.mesh, k, 1)
    mods = ("q_proj", "v_proj") if case.quick else None
    target = _shape_only_lora(tgt, 8, mods)
    sources = [_shape_only_lora(src, 8, mods) for _ in range(case.sources)]
    plan = build_plan(target, sources, block_size=cfg.fusion.block_size,
                      source_names=[f"src{i}" for i in range(case.sources)])
    return cfg, ModelConfig(**tgt), plan


def _family_dict(shape: Any, vocab: int, layers: int | None = None) -> dict[str, Any]:
    return dict(model_type=shape.family, vocab_size=vocab, hidden_size=shape.hidden,
                intermediate_size=shape.intermediate,
                num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads,
                num_key_value_heads=shape.kv_heads, head_dim=shape.hidden // shape.heads,
                **({"qkv_bias": True} if shape.family == "qwen2" else {}))


def _demo_setting(case: AotCase) -> tuple[Any, Any, Any]:
    """The demo's fuse step (`hfjax.demo.pipeline.fuse_config` at default sizes): its Llama
    target (``case.layers`` layers), ``case.sources`` sources alternating its Qwen2 and
    Mistral shapes, all-linear r=8 LoRAs, its fusion block and batch, a float32 base."""
    from hfjax.configs.fuse import get_config
    from hfjax.demo.pipeline import DEFAULT
    from hfjax.fusion import build_plan
    from hfjax.models.config import ModelConfig

    s = DEFAULT
    cfg = get_config()
    cfg.fusion.block_size, cfg.fusion.embed_dim = s.block_size, s.embed_dim
    cfg.fusion.num_heads, cfg.fusion.max_pos = s.num_heads, s.max_pos
    cfg.rdm.num_projections = s.num_projections
    cfg.data.cutoff_len = s.cutoff_len
    cfg.train.batch_size, cfg.train.grad_accum = s.fuse_batch, s.fuse_accum
    cfg.train.remat, cfg.train.base_dtype = case.remat, case.base_dtype
    cfg.train.scan_layers = case.scan
    for k in ("data", "fsdp", "tensor"):
        if k in cfg.mesh:
            setattr(cfg.mesh, k, 1)
    tgt = _family_dict(s.shapes["llama"], s.vocab_sizes["llama"], case.layers)
    fams = [f for f, _ in s.experts[1:]]
    srcs = [_family_dict(s.shapes[f], s.vocab_sizes[f]) for f in fams]
    sources = [_shape_only_lora(srcs[i % len(srcs)], s.lora_r, None)
               for i in range(case.sources)]
    plan = build_plan(_shape_only_lora(tgt, s.lora_r, None), sources,
                      block_size=cfg.fusion.block_size,
                      source_names=[f"src{i}" for i in range(case.sources)])
    return cfg, ModelConfig(**tgt), plan


def abstract_inputs(cfg: Any, model_cfg: Any, plan: Any, scan: bool = True) -> tuple[Any, ...]:
    """``(state, frozen, micro_batches, weights, key, statics)`` as ShapeDtypeStructs."""
    from flax import linen as nn

    from hfjax.fusion.network import pack_nets
    from hfjax.loading import init_params, resolve_dtype
    from hfjax.memory import network_shapes
    from hfjax.models.decoder import frozen_kernel_bits, module_names, stack_layers
    from hfjax.training.fuse_loop import statics_from

    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    dtype = resolve_dtype(cfg.train.base_dtype)
    base = jax.eval_shape(lambda: init_params(model_cfg, jax.random.PRNGKey(0), dtype))
    if scan:
        base = jax.eval_shape(lambda b: frozen_kernel_bits(stack_layers(b)), base)  # as fuse
    shapes = module_names(model_cfg)
    rank = {m.name: m.rank for g in plan.groups for m in g.modules}
    adapter = {}
    for name in list(rank) + list(plan.unfused):
        d_in, d_out = shapes[name]
        r = rank.get(name, 8)
        adapter[name] = {"A": sds((r, d_in), f32), "B": sds((d_out, r), f32),
                         "scale": sds((), f32)}
    contexts = {}
    for g in plan.groups:
        F = plan.block_size * g.rank
        contexts[g.name] = [
            {"tgt": sds((len(b.modules), b.n_t, F), f32), "tgt_s": sds((len(b.modules), b.n_t,
                                                                        g.rank), f32),
             "src": sds((len(b.modules), b.n_s, F), f32), "src_s": sds((len(b.modules), b.n_s,
                                                                        g.rank), f32)}
            for b in g.buckets]
    st = statics_from(cfg, plan, model_cfg, steps=100)
    nets = nn.unbox(network_shapes(plan, cfg.fusion))
    params = {"clusters": jax.eval_shape(lambda n: pack_nets(n, plan), nets),  # as fuse_loop
              "alpha": {g.name: sds((), f32) for g in plan.groups}}
    state = {"params": params, "opt_state": jax.eval_shape(st.optimizer.init, params),
             "step": sds((), jnp.int32)}
    a, B, L = cfg.train.grad_accum, cfg.train.batch_size, cfg.data.cutoff_len
    batch = {k: sds((a, B, L), jnp.int32) for k in ("input_ids", "attention_mask", "labels")}
    frozen = {"base": base, "adapter": adapter, "contexts": contexts}
    return state, frozen, batch, sds((a,), f32), sds((2,), jnp.uint32), st


def run_case(case: AotCase) -> dict[str, Any]:
    """Lower + compile one case; its timings, kernel count, XLA memory and the planner's."""
    from hfjax import memory
    from hfjax.training.fuse_step import fuse_step

    cfg, model_cfg, plan = case_setting(case)
    state, frozen, batch, weights, key, st = abstract_inputs(cfg, model_cfg, plan, case.scan)
    t0 = time.perf_counter()
    lowered = fuse_step.lower(state, frozen, batch, weights, key, st=st)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    p = memory.memory_plan(cfg, model_cfg, plan, mesh_shape={"data": 1, "fsdp": 1, "tensor": 1})
    b = p["bytes"]
    transient = sum(b[k] for k in ("gradients", "lm_activations", "logits",
                                   "network_activations", "upcast_weights"))
    return {"case": case, "lower_s": t1 - t0, "compile_s": t2 - t1,
            "kernels": count_kernels(compiled.as_text()),
            "xla_temp": int(mem.temp_size_in_bytes), "xla_args": int(mem.argument_size_in_bytes),
            "plan_transient": int(transient), "plan_total": int(p["total"]),
            "backend": jax.default_backend()}


def format_row(r: dict[str, Any]) -> str:
    c = r["case"]
    return (f"{c.sources:>3} {c.layers:>4} {'on' if c.remat else 'off':>5} {c.base_dtype:>8} "
            f"{'scan' if c.scan else 'loop':>5} {r['lower_s']:7.1f} {r['compile_s']:8.1f} "
            f"{r['kernels']:7d} {r['xla_temp'] / MiB:10.1f} {r['xla_args'] / MiB:10.1f} "
            f"{r['plan_transient'] / MiB:10.1f} {r['plan_total'] / MiB:10.1f} "
            f"{r['xla_temp'] / max(r['plan_transient'], 1):6.2f}")


HEADER = ("src  lay remat    dtype  body lower_s compile_s kernels   xla_temp   xla_args "
          "plan_trans   plan_tot temp/plan   (MiB per device)")


def bench_aot(layers: Sequence[int], sources: Sequence[int], remat: Sequence[bool], *,
              quick: bool = False, base_dtype: str = "bfloat16",
              scan: Sequence[bool] = (True,), demo: bool = False) -> list[dict[str, Any]]:
    """Print (and return) one row per (sources, layers, remat) case."""
    what = "the demo's fuse step" if demo else "quick tiny model" if quick else "paper setting"
    print(f"AOT fuse_step ({what}, backend "
          f"{jax.default_backend()}); compile seconds on this machine")
    print(HEADER)
    rows = []
    for s in sources:
        for sc in scan:
            for rm in remat:
                for n in layers:
                    r = run_case(AotCase(layers=n, sources=s, remat=rm, base_dtype=base_dtype,
                                         quick=quick, scan=sc, demo=demo))
                    print(format_row(r), flush=True)
                    rows.append(r)
    return rows


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model (seconds, any CPU)")
    ap.add_argument("--demo", action="store_true",
                    help="the embedded demo's fuse step (4 sources, float32 base)")
    ap.add_argument("--layers", type=_ints, default=None, help="comma list of depths")
    ap.add_argument("--sources", type=_ints, default=None, help="comma list of source counts")
    ap.add_argument("--remat", choices=("off", "on", "both"), default="both",
                    help="remat setting(s) to compile")
    ap.add_argument("--base-dtype", default="bfloat16", help="frozen base dtype")
    ap.add_argument("--body", choices=("scan", "loop", "both"), default="scan",
                    help="decoder layers as one lax.scan, the unrolled loop, or both")
    a = ap.parse_args(argv)
    layers = a.layers or ([4] if a.demo else [2, 4, 8] if a.quick else [8, 32, 80])
    sources = a.sources or ([4] if a.demo else [1, 2] if a.quick else [1, 5])
    base_dtype = "float32" if a.demo and a.base_dtype == "bfloat16" else a.base_dtype
    remat = {"off": [False], "on": [True], "both": [False, True]}[a.remat]
    scan = {"scan": [True], "loop": [False], "both": [True, False]}[a.body]
    bench_aot(layers, sources, remat, quick=a.quick, base_dtype=base_dtype, scan=scan,
              demo=a.demo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

