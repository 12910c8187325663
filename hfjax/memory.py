"""Per-device memory plan of a fuse run, before anything is allocated.

::

    plan_dict = memory_plan(cfg, model_cfg, plan)            # the configured mesh
    print(memory_plan_text(cfg, model_cfg, plan, mesh_shape={"data": 1, "fsdp": 8,
                                                             "tensor": 1}))
    python -m hfjax.memory          # the paper setting on 1 x 80 GB and on 8 GPUs (fsdp 8)

Every figure is bytes held by ONE device, with each array sharded by ``cfg.mesh.rules``
exactly as `hfjax.sharding` places it (same rules, same fitting of odd dimensions):

exact (computed from shapes, equal to what a run allocates)
    ``base``            frozen base weights in ``train.base_dtype``;
    ``networks``        the transfer networks' float32 parameters;
    ``alphas``          one float32 α per group;
    ``adamw``           AdamW's two moments (same shapes and shardings as the networks and
                        α's) and its step counters;
    ``contexts``        the block contexts (float32 tokens + singular values);
    ``target_adapter``  the frozen target LoRA in float32 (replicated).
transient (one optimizer step)
    ``gradients``       one network-sized float32 buffer (gradients / updates);
estimates
    ``lm_activations``  the base forward's residuals for one micro-batch of
        ``B = train.batch_size`` by ``L = data.cutoff_len`` tokens, ``D`` hidden, ``N`` layers,
        ``I`` intermediate, ``H`` heads, dtype bytes ``b``::

            per layer  = B·L·(4D + 3·Dq + 3·Dkv + 3I)·b  + B·L·2D·4        (linears, f32 norms)
                       + B·H·L²·(4 + b)                                    (scores f32, probs)
            no remat   = N · per layer
            remat      = N · B·L·D·b  +  per layer       (layer inputs + one layer recomputed)

        plus ``logits`` = ``2 · B·L·V·4`` (float32 logits and their gradient). Each part is
        divided by its activation sharding (``batch``, ``embed``, ``heads``, ``mlp``,
        ``vocab`` rules). XLA fuses and reuses buffers, so read it as an order of magnitude
        (the tests keep it within 3x of XLA's own temp-buffer figure for a tiny model).
    ``network_activations``  per bucket of ``M`` modules and ``n = n_t + n_s`` tokens:
        ``M·n·(2F + 10E)·4`` (input LayerNorm in/out, the two views, gate, norm) ``+
        M·n_b·2F·4`` (decoder output) ``+ 3·M·n·K·4`` (RDM projections), ``F = block·r``.

    ``upcast_weights``  backend-dependent: XLA:CPU has no bf16/f16 dot, so it converts a
        narrow base's weights to float32 for its dots. With the layers unrolled (or an f16
        base) it keeps every layer's copy alive from the forward to the backward:
        ``N · layer params · 4``. A scanned bf16 base hands its kernels to the layer body as
        integer bits (``hfjax.models.decoder._kernels_as_bits``), so each layer is up-cast
        inside the loop: ``1 · layer params · 4``. Plus the output head's float32 copy (the
        logits' dot). Zero on GPU/TPU (native bf16 dots) and for a float32 base.
        For the same reason ``lm_activations`` use ``b = 4`` on CPU whatever the base dtype.

Assumptions: one micro-batch's activations are alive at a time (the micro-batches are a
scan), the networks run once per optimizer step, and the backend is the one the plan is
made for (``backend``, default: JAX's default backend). ``memory_analysis()`` of a CPU
compile says nothing about GPU memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from hfjax.sharding import (
    MESH_AXES,
    Rules,
    logical_to_mesh_spec,
    rules_for_batch,
    rules_from_config,
)

GiB = float(1 << 30)
_ORDER = ("base", "networks", "alphas", "adamw", "gradients", "contexts", "target_adapter",
          "lm_activations", "logits", "network_activations", "upcast_weights")
_EXACT = ("base", "networks", "alphas", "adamw", "contexts", "target_adapter")


class _MeshShape:
    """What `logical_to_mesh_spec` needs of a mesh: ``.shape`` (axis -> size)."""

    def __init__(self, sizes: Mapping[str, int]) -> None:
        self.shape = {a: int(sizes[a]) for a in MESH_AXES}


def resolve_mesh_shape(mesh_cfg: Any, mesh_shape: Mapping[str, int] | None = None,
                       n_devices: int | None = None) -> dict[str, int]:
    """``{data, fsdp, tensor}`` sizes: ``mesh_shape`` if given, else ``cfg.mesh`` with ``-1``
    resolved against ``n_devices`` (default: ``jax.device_count()``)."""
    if mesh_shape is not None:
        return {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    sizes = {a: int(getattr(mesh_cfg, a)) for a in MESH_AXES}
    if -1 in sizes.values():
        if n_devices is None:
            import jax

            n_devices = jax.device_count()
        known = math.prod(v for v in sizes.values() if v != -1)
        sizes = {a: (max(1, n_devices // known) if v == -1 else v) for a, v in sizes.items()}
    return sizes


def _shards(logical: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules,
            mesh: _MeshShape) -> tuple[int, ...]:
    """Per-dimension shard counts of an array placed by ``rules`` on ``mesh``."""
    spec = tuple(logical_to_mesh_spec(logical, rules, shape, mesh))
    spec += (None,) * (len(shape) - len(spec))
    out = []
    for axes in spec:
        ax = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        out.append(math.prod(mesh.shape[a] for a in ax))
    return tuple(out)


def array_bytes(shape: tuple[int, ...], itemsize: int, logical: tuple[str | None, ...],
                rules: Rules, mesh: _MeshShape) -> int:
    """Bytes one device holds of an array of ``shape`` with logical axes ``logical``."""
    shards = _shards(logical, shape, rules, mesh)
    return int(math.prod(-(-d // s) for d, s in zip(shape, shards, strict=True)) * itemsize)


# ----------------------------------------------------------------------------- pieces
def base_bytes(model_cfg: Any, dtype: Any, rules: Rules, mesh: _MeshShape) -> int:
    from hfjax.models.key_tables import key_table, our_shape

    item = np.dtype(dtype).itemsize
    return sum(array_bytes(our_shape(s, model_cfg), item, s.axes, rules, mesh)
               for s in key_table(model_cfg))


def network_shapes(plan: Any, fusion_cfg: Any) -> dict[str, Any]:
    """``{group: boxed ShapeDtypeStructs}`` of every network, without allocating.

    Uses `TransferNet.init` under ``jax.eval_shape`` directly (not ``init_fusion_params``,
    whose cached jitted init must only ever be called concretely)."""
    import jax
    import jax.numpy as jnp

    from hfjax.fusion import TransferNet

    out = {}
    for g in plan.groups:
        net = TransferNet(block_size=plan.block_size, rank=g.rank, embed_dim=fusion_cfg.embed_dim,
                          num_heads=fusion_cfg.num_heads, max_pos=fusion_cfg.max_pos,
                          mu_gate=float(fusion_cfg.mu_gate), gate=fusion_cfg.gate)
        F = plan.block_size * g.rank

        def init(key: Any, net: Any = net, F: int = F, r: int = g.rank) -> Any:
            return net.init(key, jnp.zeros((1, 2, F)), jnp.zeros((1, 2, r)),
                            jnp.zeros((1, 1, F)), jnp.zeros((1, 1, r)), n_a=1)["params"]

        out[g.name] = jax.eval_shape(init, jax.random.PRNGKey(0))
    return out


def _network_bytes(plan: Any, fusion_cfg: Any, rules: Rules, mesh: _MeshShape
                   ) -> tuple[dict[str, Any], int, int]:
    """(per-leaf per-device bytes tree of ``{"nets", "alpha"}``, nets bytes, scalar count)."""
    import jax
    from flax import linen as nn

    from hfjax.sharding import fusion_logical_specs

    boxed = {"nets": network_shapes(plan, fusion_cfg),
             "alpha": {g.name: jax.ShapeDtypeStruct((), np.float32) for g in plan.groups}}
    specs = fusion_logical_specs(boxed)
    shapes = nn.unbox(boxed)
    per_leaf = jax.tree.map(
        lambda s, x: array_bytes(tuple(x.shape), np.dtype(x.dtype).itemsize, tuple(s), rules,
                                 mesh),
        specs, shapes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    nets = sum(jax.tree.leaves(per_leaf["nets"]))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["nets"]))
    return {"tree": per_leaf, "shapes": shapes}, nets, n_params


def _adamw_bytes(optim: Any, shapes: Any, per_leaf: Any) -> int:
    """Per-device bytes of AdamW's state: moments as their parameters, counters replicated."""
    import jax
    import optax

    opt = optim.build(100)
    state = jax.eval_shape(opt.init, shapes)
    sizes = optax.tree_utils.tree_map_params(
        opt, lambda _, b: b, state, per_leaf,
        transform_non_params=lambda x: int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize)
    return int(sum(jax.tree.leaves(sizes)))


def context_bytes(plan: Any, rules: Rules, mesh: _MeshShape) -> int:
    total = 0
    for g in plan.groups:
        F, r = plan.block_size * g.rank, g.rank
        for b in g.buckets:
            m = len(b.modules)
            for n in (b.n_t, b.n_s):
                total += array_bytes((m, n, F), 4, (None, "tokens", "block"), rules, mesh)
                total += array_bytes((m, n, r), 4, (None, "tokens", "lora_r"), rules, mesh)
    return total


def target_adapter_bytes(model_cfg: Any, plan: Any) -> int:
    """The frozen target LoRA in float32 (replicated): fused modules at their plan rank,
    unfused ones at the rank of their module type (else the plan's first rank)."""
    from hfjax.models.decoder import module_names

    shapes = module_names(model_cfg)
    rank_of = {m.name: m.rank for g in plan.groups for m in g.modules}
    type_rank = {g.module_type: g.rank for g in plan.groups}
    default = plan.groups[0].rank if plan.groups else 0
    total = 0
    for name in list(rank_of) + list(plan.unfused):
        d_in, d_out = shapes[name]
        r = rank_of.get(name, type_rank.get(name.rsplit(".", 1)[-1], default))
        total += (r * d_in + d_out * r) * 4 + 4
    return total


def lm_activation_bytes(model_cfg: Any, batch: int, length: int, dtype: Any, remat: bool,
                        rules: Rules, mesh: _MeshShape) -> tuple[int, int]:
    """(decoder residuals, logits + their gradient) of one micro-batch: the documented
    estimate, divided by the activation shardings."""
    c = model_cfg
    b = np.dtype(dtype).itemsize
    B, L, D, N = batch, length, c.hidden_size, c.num_hidden_layers
    H, hd, Hkv, I, V = (c.num_attention_heads, c.head_dim, c.num_key_value_heads,
                        c.intermediate_size, c.vocab_size)
    Dkv = Hkv * hd

    def per_dev(names: tuple[str | None, ...], shape: tuple[int, ...], itemsize: int) -> int:
        return array_bytes(shape, itemsize, names, rules, mesh)

    tok = ("batch", "seq")
    per_layer = (per_dev(tok + ("embed",), (B, L, D), b) * 4
                 + per_dev(tok + ("embed",), (B, L, D), 4) * 2
                 + per_dev(tok + ("heads", None), (B, L, H, hd), b) * 3
                 + per_dev(tok + (None,), (B, L, Dkv), b) * 3
                 + per_dev(tok + ("mlp",), (B, L, I), b) * 3
                 + per_dev(("batch", "heads", "seq", None), (B, H, L, L), 4 + b))
    if remat:
        resid = N * per_dev(tok + ("embed",), (B, L, D), b) + per_layer
    else:
        resid = N * per_layer
    logits = 2 * per_dev(tok + ("vocab",), (B, L, V), 4)
    return int(resid), int(logits)


def upcast_weight_bytes(model_cfg: Any, dtype: Any, backend: str, scanned: bool,
                        rules: Rules, mesh: _MeshShape) -> int:
    """float32 copies of the base weights that the backend makes for its dots (see the
    module docstring): on CPU one layer's for a scanned bf16 base, else all layers'."""
    from hfjax.models.key_tables import key_table, our_shape

    if backend != "cpu" or np.dtype(dtype).itemsize >= 4:
        return 0
    table = key_table(model_cfg)
    layer = sum(array_bytes(our_shape(s, model_cfg), 4, s.axes, rules, mesh)
                for s in table if s.ours[0] == "layers" and s.ours[1] == 0)
    heads = [s for s in table if s.ours[0] == "lm_head"] or [s for s in table
                                                            if s.ours[0] == "embed"]
    head = sum(array_bytes(our_shape(s, model_cfg), 4, s.axes, rules, mesh) for s in heads)
    one_at_a_time = scanned and np.dtype(dtype) == np.dtype(jnp.bfloat16)
    return int((1 if one_at_a_time else model_cfg.num_hidden_layers) * layer + head)


def network_activation_bytes(plan: Any, fusion_cfg: Any, num_projections: int, rules: Rules,
                             mesh: _MeshShape) -> int:
    E, K = fusion_cfg.embed_dim, num_projections
    total = 0
    for g in plan.groups:
        F = plan.block_size * g.rank
        for b in g.buckets:
            m, n = len(b.modules), b.n_t + b.n_s
            total += 2 * array_bytes((m, n, F), 4, (None, "tokens", "block"), rules, mesh)
            total += m * n * 10 * E * 4
            total += 2 * array_bytes((m, b.n_b, F), 4, (None, "tokens", "block"), rules, mesh)
            total += 3 * m * n * K * 4
    return total


# ----------------------------------------------------------------------------- the plan
def memory_plan(cfg: Any, model_cfg: Any, plan: Any,
                mesh_shape: Mapping[str, int] | None = None,
                backend: str | None = None) -> dict[str, Any]:
    """Per-device bytes of a fuse run (see the module docstring for what each entry counts).

    ``cfg`` is a `hfjax.config.FuseJob`, or a fuse ConfigDict read into one unchecked (a
    plan for a setting whose files need not exist).
    Returns ``{"mesh": sizes, "bytes": {component: int}, "total": int, "exact": [...],
    "network_params": int, "micro_batch": (B, L), "remat": bool, "base_dtype": str,
    "backend": str, "scan_layers": bool}``. ``backend``: the platform the step compiles for
    (``"cpu"``, ``"gpu"``, ``"tpu"``; default ``jax.default_backend()``).
    """
    import jax

    from hfjax.config.jobs import FuseJob, fuse_job_from
    from hfjax.loading import resolve_dtype

    job = cfg if isinstance(cfg, FuseJob) else fuse_job_from(cfg)[0]
    sizes = resolve_mesh_shape(job.mesh, mesh_shape)
    mesh = _MeshShape(sizes)
    tr = job.train
    rules = rules_for_batch(rules_from_config(job.mesh.rules), mesh, tr.batch_size)
    dtype = resolve_dtype(tr.base_dtype)
    backend = backend or jax.default_backend()
    scanned = bool(tr.scan_layers)
    nets, nets_bytes, n_params = _network_bytes(plan, job.net, rules, mesh)
    alphas = sum(nets["tree"]["alpha"].values())
    # XLA:CPU runs narrow-float arithmetic in float32 (its residuals are float32 too).
    act_dtype = np.float32 if backend == "cpu" else dtype
    resid, logits = lm_activation_bytes(model_cfg, tr.batch_size, job.data.cutoff_len,
                                        act_dtype, bool(tr.remat), rules, mesh)
    out = {
        "base": base_bytes(model_cfg, dtype, rules, mesh),
        "networks": nets_bytes,
        "alphas": int(alphas),
        "adamw": _adamw_bytes(job.optim, nets["shapes"], nets["tree"]),
        "gradients": nets_bytes + int(alphas),
        "contexts": context_bytes(plan, rules, mesh),
        "target_adapter": target_adapter_bytes(model_cfg, plan),
        "lm_activations": resid,
        "logits": logits,
        "network_activations": network_activation_bytes(plan, job.net,
                                                        job.rdm.num_projections, rules, mesh),
        "upcast_weights": upcast_weight_bytes(model_cfg, dtype, backend, scanned, rules, mesh),
    }
    return {"mesh": sizes, "bytes": out, "total": int(sum(out.values())),
            "exact": list(_EXACT), "network_params": n_params,
            "micro_batch": (int(tr.batch_size), int(job.data.cutoff_len)),
            "remat": bool(tr.remat), "base_dtype": np.dtype(dtype).name,
            "backend": backend, "scan_layers": scanned,
            "groups": len(plan.groups)}


def memory_plan_text(cfg: Any, model_cfg: Any, plan: Any,
                     mesh_shape: Mapping[str, int] | None = None,
                     device_gib: float | None = None, backend: str | None = None) -> str:
    """`memory_plan` as a table (GiB per device); ``device_gib`` adds a fits / does-not line."""
    p = memory_plan(cfg, model_cfg, plan, mesh_shape, backend)
    m = p["mesh"]
    B, L = p["micro_batch"]
    lines = [f"memory per device (mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}, "
             f"{math.prod(m.values())} device(s); base {p['base_dtype']}, micro-batch {B}x{L}, "
             f"remat {'on' if p['remat'] else 'off'}, layers "
             f"{'scanned' if p['scan_layers'] else 'unrolled'}, backend {p['backend']}):"]
    notes = {"base": "frozen base weights", "networks": f"{p['network_params'] / 1e6:.1f} M "
             f"float32 params, {p['groups']} network(s)", "alphas": "one per group",
             "adamw": "2 moments + counters", "gradients": "transient, one step",
             "contexts": "block contexts, float32", "target_adapter": "float32, replicated",
             "lm_activations": "estimate, one micro-batch", "logits": "estimate: 2 x B.L.V.4",
             "network_activations": "estimate, incl. RDM",
             "upcast_weights": "XLA:CPU f32 copies of a narrow base (0 on GPU)"}
    for k in _ORDER:
        v = p["bytes"][k]
        lines.append(f"  {k:<20} {v / GiB:9.3f} GiB   {notes[k]}")
    lines.append(f"  {'total':<20} {p['total'] / GiB:9.3f} GiB")
    if device_gib is not None:
        ok = p["total"] <= device_gib * GiB
        lines.append(f"  -> {'fits' if ok else 'does NOT fit'} in {device_gib:g} GiB "
                     f"({100 * p['total'] / (device_gib * GiB):.0f}% used)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- paper setting
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128)
QWEN25_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584,
                 intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, head_dim=128, qkv_bias=True)


def _shape_only_lora(model: Mapping[str, Any], r: int) -> Any:
    """An all-linear LoRA whose arrays are zero-stride views (shapes only, no memory)."""
    from bridge import LoraAdapter, LoraModule, make_adapter_config
    from hfjax.models.config import ModelConfig
    from hfjax.models.decoder import module_names

    cfg = ModelConfig(**model)
    zero = np.float32(0)
    mods = {name: LoraModule(name=name, A=np.broadcast_to(zero, (r, d_in)),
                             B=np.broadcast_to(zero, (d_out, r)), scale=2.0)
            for name, (d_in, d_out) in module_names(cfg).items()}
    return LoraAdapter(config=make_adapter_config(r=r, lora_alpha=2 * r,
                                                  target_modules=sorted({n.rsplit(".", 1)[-1]
                                                                         for n in mods})),
                       modules=mods)


def paper_setting(n_sources: int = 5) -> tuple[Any, Any, Any]:
    """``(cfg, model_cfg, plan)`` of single_source_qwen_to_llama: Llama-3.1-8B target (bf16),
    ``n_sources`` Qwen2.5-7B r=8 all-linear sources, the paper's training block."""
    from hfjax.configs.fuse import get_config
    from hfjax.fusion import build_plan
    from hfjax.models.config import ModelConfig

    cfg = get_config()
    target = _shape_only_lora(LLAMA31_8B, 8)
    sources = [_shape_only_lora(QWEN25_7B, 8) for _ in range(n_sources)]
    plan = build_plan(target, sources, block_size=cfg.fusion.block_size,
                      source_names=[f"qwen{i}" for i in range(n_sources)])
    return cfg, ModelConfig(**LLAMA31_8B), plan


def paper_memory_report() -> str:
    """The paper setting's plan on 1 x 80 GB and on 8 GPUs (fsdp 8), remat off / on."""
    cfg, model_cfg, plan = paper_setting()
    lines = ["Paper setting: Llama-3.1-8B (bf16) target, 5 Qwen2.5-7B sources, r=8 all-linear, "
             "block 4096, E 1024, 2048 projections, batch 1 x cutoff 1024, accum 8"]
    for g in plan.groups:
        bk = ", ".join(f"{len(b.modules)} x ({b.n_t}+{b.n_s})" for b in g.buckets)
        lines.append(f"  {g.name}: {bk} tokens")
    for title, shape in (("1 GPU, 80 GB", {"data": 1, "fsdp": 1, "tensor": 1}),
                         ("8 GPUs, fsdp 8", {"data": 1, "fsdp": 8, "tensor": 1})):
        for remat in (False, True):
            cfg.train.remat = remat
            lines.append(f"\n[{title}]")
            lines.append(memory_plan_text(cfg, model_cfg, plan, mesh_shape=shape, device_gib=80,
                                          backend="gpu"))
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m hfjax.memory` (README); the CLI's `hfjax memory`
    print(paper_memory_report())
