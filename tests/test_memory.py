"""The memory plan: exact for everything that is allocated from shapes, an estimate for
activations (checked against XLA's own figure), and the paper setting's numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hfjax.configs.fuse import get_config

from hfjax import memory
from hfjax import sharding as shd
from hfjax.models.config import ModelConfig

TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
SOURCE = dict(model_type="qwen2", vocab_size=640, hidden_size=48, intermediate_size=96,
              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
              qkv_bias=True)


def _tiny_cfg():
    cfg = get_config()
    cfg.fusion.block_size = 16
    cfg.fusion.embed_dim = 32
    cfg.fusion.num_heads = 4
    cfg.fusion.max_pos = 64
    cfg.rdm.num_projections = 16
    cfg.train.base_dtype = "float32"
    cfg.train.batch_size = 2
    cfg.data.cutoff_len = 128
    cfg.mesh.data = 1
    return cfg


def test_exact_components_match_a_placed_run():
    """base / networks / alphas / AdamW / contexts / target adapter: bytes equal to the
    arrays a run places (one device here; the 2x2x2 case is checked in test_sharding)."""
    from flax import linen as nn

    from hfjax.fusion import build_contexts, build_plan, init_fusion_params
    from hfjax.loading import init_params
    from hfjax.models.key_tables import logical_axes_tree
    from hfjax.testing.models import random_lora
    from hfjax.training.optim import adamw

    cfg = _tiny_cfg()
    mc = ModelConfig(**TINY)
    target = random_lora(mc, r=4, seed=0)
    sources = [random_lora(ModelConfig(**SOURCE), r=4, seed=1,
                           target_modules=("q_proj", "v_proj", "down_proj"))]
    plan = build_plan(target, sources, block_size=cfg.fusion.block_size)
    assert plan.unfused  # the exact count includes unfused target modules too
    mesh = shd.make_mesh(data=1)
    rules = shd.rules_from_config(cfg.mesh.rules)
    f = cfg.fusion
    boxed = init_fusion_params(plan, None, key=jax.random.PRNGKey(0), embed_dim=f.embed_dim,
                               num_heads=f.num_heads, max_pos=f.max_pos, boxed=True)
    params = shd.put_tree(nn.unbox(boxed), shd.logical_to_named(
        shd.fusion_logical_specs(boxed), mesh, rules, shapes=nn.unbox(boxed)))
    opt = adamw(1e-3, 10)
    contexts = build_contexts(plan, target, sources)
    placed = {
        "base": shd.shard_params(init_params(mc, jax.random.PRNGKey(1)), logical_axes_tree(mc),
                                 mesh, rules),
        "networks": params["nets"],
        "alphas": params["alpha"],
        "adamw": opt.init(params),
        "contexts": shd.shard_params(contexts, shd.context_specs(contexts), mesh, rules),
        "target_adapter": target.to_jax(jnp.float32),
    }
    plan_bytes = memory.memory_plan(cfg, mc, plan)
    assert plan_bytes["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    for k, tree in placed.items():
        assert plan_bytes["bytes"][k] == shd.bytes_per_device(tree), k
    assert plan_bytes["network_params"] == sum(x.size for x in jax.tree.leaves(params["nets"]))
    assert plan_bytes["total"] == sum(plan_bytes["bytes"].values())


def test_activation_estimate_is_close_to_xla():
    """No remat: the documented estimate vs XLA's temp buffers for one micro-batch's LM
    gradient (the step's activations), within 2x."""
    from hfjax.loading import init_params
    from hfjax.testing.models import random_lora
    from hfjax.training.objective import lm_loss

    cfg = _tiny_cfg()
    mc = ModelConfig(**TINY)
    params = init_params(mc, jax.random.PRNGKey(0))
    adapter = random_lora(mc, r=4).to_jax(jnp.float32)
    B, L = cfg.train.batch_size, cfg.data.cutoff_len
    batch = {"input_ids": jnp.zeros((B, L), jnp.int32),
             "attention_mask": jnp.ones((B, L), jnp.int32),
             "labels": jnp.ones((B, L), jnp.int32)}

    def loss(b):
        return lm_loss(params, mc, batch, {k: {**v, "B": b[k]} for k, v in adapter.items()})

    Bs = {k: v["B"] for k, v in adapter.items()}
    xla = jax.jit(jax.grad(loss)).lower(Bs).compile().memory_analysis().temp_size_in_bytes
    rules = shd.rules_from_config(cfg.mesh.rules)
    mesh = memory._MeshShape({"data": 1, "fsdp": 1, "tensor": 1})
    est = sum(memory.lm_activation_bytes(mc, B, L, jnp.float32, False, rules, mesh))
    assert 0.5 <= est / xla <= 2.0, (est, xla)
    remat = sum(memory.lm_activation_bytes(mc, B, L, jnp.float32, True, rules, mesh))
    assert remat < est


def test_paper_setting_plan():
    cfg, mc, plan = memory.paper_setting()
    assert len(plan.groups) == 7 and all(g.rank == 8 for g in plan.groups)
    q = plan.group("q_proj_r8")
    assert [(len(b.modules), b.n_t, b.n_s) for b in q.buckets] == [(28, 2, 10)]
    one = memory.memory_plan(cfg, mc, plan, {"data": 1, "fsdp": 1, "tensor": 1})
    eight = memory.memory_plan(cfg, mc, plan, {"data": 1, "fsdp": 8, "tensor": 1})
    n_base = sum(int(np.prod(s)) for s in _llama_shapes(mc))
    assert one["bytes"]["base"] == 2 * n_base  # bf16
    assert 8.0e9 < n_base < 8.1e9
    assert abs(one["network_params"] / 773e6 - 1) < 0.01  # docs/algorithm.md §4: ~773M for 7 groups
    assert one["bytes"]["networks"] == 4 * one["network_params"] + 0
    assert one["bytes"]["adamw"] == 2 * (one["bytes"]["networks"] + one["bytes"]["alphas"]) + 8
    assert one["bytes"]["base"] / eight["bytes"]["base"] > 7.9
    assert one["bytes"]["networks"] / eight["bytes"]["networks"] > 4
    assert one["total"] < 80 * memory.GiB and eight["total"] < one["total"]
    text = memory.memory_plan_text(cfg, mc, plan, {"data": 1, "fsdp": 8, "tensor": 1},
                                   device_gib=80)
    assert "fsdp=8" in text and "fits in 80 GiB" in text and "total" in text


def _llama_shapes(mc: ModelConfig):
    from hfjax.models.key_tables import key_table, our_shape

    return [our_shape(s, mc) for s in key_table(mc)]


def test_resolve_mesh_shape():
    cfg = get_config()
    assert memory.resolve_mesh_shape(cfg.mesh, n_devices=8) == {"data": 8, "fsdp": 1,
                                                               "tensor": 1}
    cfg.mesh.fsdp, cfg.mesh.data = -1, 2
    assert memory.resolve_mesh_shape(cfg.mesh, n_devices=8) == {"data": 2, "fsdp": 4,
                                                               "tensor": 1}


@pytest.mark.parametrize("remat", [False, True])
def test_memory_plan_text_lists_every_component(remat):
    cfg, mc, plan = memory.paper_setting(n_sources=1)
    cfg.train.remat = remat
    text = memory.memory_plan_text(cfg, mc, plan)
    for k in ("base", "networks", "adamw", "contexts", "lm_activations", "logits", "total"):
        assert k in text
    assert ("remat on" in text) == remat


def test_planner_matches_xla_for_the_compiled_fuse_step():
    """The whole fuse step compiled ahead of time (abstract shapes, scanned layers, float32
    base, this backend): the planner's transient part within 1.3x of XLA's temp buffers."""
    from hfjax.bench_aot import AotCase, run_case

    r = run_case(AotCase(layers=4, sources=1, remat=False, base_dtype="float32", quick=True))
    ratio = r["xla_temp"] / r["plan_transient"]
    assert 1 / 1.3 <= ratio <= 1.3, (r["xla_temp"], r["plan_transient"])


def test_planner_models_the_backend():
    """A bf16 base: CPU counts float32 copies of one layer when scanned (the kernels are
    up-cast inside the loop) and of every layer unrolled (XLA:CPU keeps them); GPU none."""
    cfg = _tiny_cfg()
    cfg.train.base_dtype = "bfloat16"
    mc = ModelConfig(**TINY)
    from hfjax.fusion import build_plan
    from hfjax.testing.models import random_lora

    target = random_lora(mc, r=4, seed=0, target_modules=("q_proj",))
    plan = build_plan(target, [random_lora(ModelConfig(**SOURCE), r=4, seed=1,
                                           target_modules=("q_proj",))],
                      block_size=cfg.fusion.block_size)
    gpu = memory.memory_plan(cfg, mc, plan, backend="gpu")
    cpu = memory.memory_plan(cfg, mc, plan, backend="cpu")
    cfg.train.scan_layers = False
    loop = memory.memory_plan(cfg, mc, plan, backend="cpu")
    assert gpu["bytes"]["upcast_weights"] == 0 and gpu["backend"] == "gpu"
    from hfjax.models.key_tables import key_table, our_shape

    def f32_bytes(part):
        return sum(int(np.prod(our_shape(s, mc))) * 4 for s in key_table(mc)
                   if s.ours[0] == part)

    head = f32_bytes("lm_head") or f32_bytes("embed")  # the logits' dot
    assert loop["bytes"]["upcast_weights"] == f32_bytes("layers") + head
    assert (cpu["bytes"]["upcast_weights"] - head) * mc.num_hidden_layers == f32_bytes("layers")
    assert cpu["bytes"]["lm_activations"] > gpu["bytes"]["lm_activations"]  # f32 on CPU
    cfg.train.base_dtype = "float32"
    assert memory.memory_plan(cfg, mc, plan, backend="cpu")["bytes"]["upcast_weights"] == 0
    assert "backend cpu" in memory.memory_plan_text(cfg, mc, plan, backend="cpu")


def test_scanned_bf16_base_is_upcast_one_layer_at_a_time(monkeypatch):
    """XLA:CPU up-casts a bf16 dot's operands; given kernels sliced from the stacked bf16
    array it used to up-cast the whole stack outside the loop (a float32 copy of every
    layer, alive from the forward to the backward). The scanned decoder hands the kernels
    over as bits, so no stacked float32 kernel exists in the compiled gradient; the values
    are the plain bf16 forward's; a gradient w.r.t. the base raises."""
    from hfjax.loading import init_params
    from hfjax.models.decoder import forward, stack_layers
    from hfjax.training.objective import lm_loss

    if jax.default_backend() != "cpu":
        pytest.skip("the bits path is CPU-only")
    mc = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     head_dim=16)
    params = init_params(mc, jax.random.key(0), jnp.bfloat16)
    stacked = stack_layers(params)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 3, 64)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    for remat in (False, True):
        def grad(e, p, remat=remat):
            return jax.grad(lambda e: lm_loss({**p, "embed": e}, mc, batch, {}, remat=remat))(e)

        text = jax.jit(grad).lower(stacked["embed"], stacked).compile().as_text()
        for shape in ("f32[4,64,64]", "f32[4,64,96]", "f32[4,96,64]"):
            assert shape not in text, (remat, shape)
    def logits_and_grad(p):
        return jax.jit(lambda p: (forward(p, mc, ids, batch["attention_mask"], {})[0],
                                  jax.grad(lambda e: lm_loss({**p, "embed": e}, mc, batch,
                                                             {}))(p["embed"])))(p)

    got = logits_and_grad(stacked)
    from hfjax.models.decoder import frozen_kernel_bits

    stored = frozen_kernel_bits(stacked)  # what the fuse loop holds: bits, converted once
    assert stored["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.uint16
    owned = jax.tree.map(jnp.copy, stacked)
    consumed = frozen_kernel_bits(owned, consume=True)
    assert owned["layers"]["mlp"]["up_proj"]["kernel"].is_deleted()
    assert not owned["layers"]["input_norm"].is_deleted()  # only the kernels are replaced
    np.testing.assert_array_equal(np.asarray(consumed["layers"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(stored["layers"]["mlp"]["up_proj"]["kernel"]))
    text = jax.jit(lambda e, p: jax.grad(lambda e: lm_loss({**p, "embed": e}, mc, batch, {}))(
        e)).lower(stored["embed"], stored).compile().as_text()
    assert "u16[4,64,96]{2,1,0} fusion" not in text  # no per-step copy of the stack
    for a, b in zip(logits_and_grad(stored), got, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(TypeError, match="frozen bits"):
        jax.grad(lambda p: lm_loss(p, mc, batch, {}))(stacked)
    import hfjax.models.decoder as decoder

    monkeypatch.setattr(decoder, "_kernels_as_bits", lambda layers: layers)  # plain bf16
    want = logits_and_grad(stacked)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # ... and the plain path does have the stacked float32 copies (what this test guards)
    text = jax.jit(lambda e, p: jax.grad(lambda e: lm_loss({**p, "embed": e}, mc, batch, {}))(
        e)).lower(stacked["embed"], stacked).compile().as_text()
    assert "f32[4,64,96]" in text
