"""The step's group-stacked factors (docs/performance.md §6): the same numbers as the
per-module path, with a few arrays per group however deep the model.

- `predict_group_deltas` equals un-blocking each module of the networks' raw outputs, also
  when a group's buckets interleave its layers;
- `set_stacked` equals `stack_adapter` of the per-module patched adapter (partial layers,
  padded ranks);
- the whole window's loss and gradients are the same with a scanned (stacked) base, which
  takes the factors as stacked arrays, and with the unrolled base, which takes them per
  module, for every update mode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.config.components import OptimizerConfig, RDMConfig, TransferNetConfig
from hfjax.fusion import build_contexts, build_plan, init_fusion_params, predict_deltas
from hfjax.fusion.network import (
    TransferNet,
    group_clusters,
    merged_calls,
    predict_group_deltas,
    query_range,
    split_groups,
    stack_groups,
)
from hfjax.loading import init_params
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import set_stacked, stack_adapter, stack_layers
from hfjax.testing.adapters import random_adapter
from hfjax.testing.models import random_lora
from hfjax.training.fuse_step import (
    FuseStatics,
    group_factors,
    loss_and_grads,
    patch_factors,
    run_networks,
)

NET = dict(embed_dim=16, num_heads=4, max_pos=32, mu_gate=0.1, gate="svd")
QKV = ("q_proj", "k_proj", "v_proj")


def _perturbed(params):
    return jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), params)


@pytest.fixture(scope="module")
def interleaved():
    """q_proj gets two buckets whose layers interleave ([0, 2] and [1]: the second source
    has q on layers 0 and 2 only)."""
    target = random_adapter(3, 24, 40, 4, modules=QKV, kv_dim=12, seed=0)
    qwen = random_adapter(3, 16, 32, 4, modules=QKV, kv_dim=8, seed=1)
    mistral = random_adapter(3, 20, 36, 4, modules=("q_proj",), seed=2, layers=(0, 2))
    plan = build_plan(target, [qwen, mistral], block_size=8, update_mode="ab_joint")
    ctx = build_contexts(plan, target, [qwen, mistral])
    params = _perturbed(init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), **NET))
    return plan, ctx, params


def test_group_deltas_equal_per_module_unblocking(interleaved):
    plan, ctx, params = interleaved
    q = plan.group("q_proj_r4")
    flat = [m.layer for b in q.buckets for m in b.modules]
    assert len(q.buckets) > 1 and flat != sorted(flat)  # the permutation is exercised
    assert merged_calls(q) == [(0, 1)]  # one call, the smaller bucket's sources padded
    d_A, d_B, aux = jax.jit(lambda p: predict_group_deltas(p, ctx, plan, **NET))(params)
    for g in plan.groups:
        net = TransferNet(block_size=plan.block_size, rank=g.rank, **NET)
        want_A, want_B = {}, {}
        for bi, (b, c) in enumerate(zip(g.buckets, ctx[g.name], strict=True)):
            delta, attn, z_t, z_s = net.apply(
                {"params": params["nets"][g.name]}, c["tgt"], c["tgt_s"], c["src"],
                c["src_s"], n_a=b.n_a, update_mode=plan.update_mode)
            got = aux[g.name][bi]
            assert got["attn"].shape == attn.shape and got["z_s"].shape == z_s.shape
            for k, v in (("attn", attn), ("z_t", z_t), ("z_s", z_s)):
                np.testing.assert_allclose(got[k], v, atol=1e-6, err_msg=f"{g.name} {k}")
            lo, _ = query_range(plan.update_mode, b.n_a, b.n_t)
            for i, m in enumerate(b.modules):
                want_A[m.name] = delta[i, : b.n_a - lo].reshape(-1, g.rank)[: m.d_in].T
                want_B[m.name] = delta[i, b.n_a - lo:].reshape(-1, g.rank)[: m.d_out]
        assert d_B[g.name].shape == (len(g.modules), g.modules[0].d_out, g.rank)
        assert d_A[g.name].shape == (len(g.modules), g.rank, g.modules[0].d_in)
        for i, m in enumerate(g.modules):
            np.testing.assert_allclose(d_B[g.name][i], want_B[m.name], atol=1e-6, err_msg=m.name)
            np.testing.assert_allclose(d_A[g.name][i], want_A[m.name], atol=1e-6, err_msg=m.name)
    per_A, per_B, _ = jax.jit(lambda p: predict_deltas(p, ctx, plan, **NET))(params)
    assert set(per_B) == set(plan.fused_modules)
    for name, v in split_groups(d_B, plan).items():
        np.testing.assert_array_equal(v, per_B[name])
    back = stack_groups(per_A, plan)
    for name in d_A:
        np.testing.assert_array_equal(back[name], d_A[name])


@pytest.mark.parametrize("mode", ["b_only", "a_only", "ab_joint"])
def test_groups_of_different_token_counts_share_one_padded_call(mode):
    """Small groups whose token counts differ (up_proj: 3 A^T + 5 B tokens, down_proj: 5 + 3,
    q_proj: 3 + 3 in two buckets of 2 and 4 source tokens) run as ONE vmapped call, padded
    (the demo's case). Every output and gradient equals the group's network applied to each
    bucket on its own (no padding at all)."""
    mods = ("q_proj", "up_proj", "down_proj")
    target = random_adapter(2, 24, 40, 4, modules=mods, seed=0)
    qwen = random_adapter(2, 16, 32, 4, modules=mods, seed=1)
    mistral = random_adapter(2, 20, 36, 4, modules=("q_proj",), seed=2, layers=(1,))
    plan = build_plan(target, [qwen, mistral], block_size=8, update_mode=mode)
    ctx = build_contexts(plan, target, [qwen, mistral])
    params = _perturbed(init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), **NET))
    shapes = {(b.n_a, b.n_b, b.n_s) for g in plan.groups for b in g.buckets}
    assert len({s[:2] for s in shapes}) == 3 and len({s[2] for s in shapes}) > 1
    assert [len(c) for c in group_clusters(plan)] == [3]

    def loss(p, padded):
        if padded:
            d_A, d_B, aux = predict_group_deltas(p, ctx, plan, **NET)
            return (sum(jnp.sum(jnp.sin(v)) for v in [*d_A.values(), *d_B.values()])
                    + sum(jnp.sum(jnp.cos(a[k])) for bs in aux.values() for a in bs
                          for k in ("attn", "z_t", "z_s")))
        total = 0.0
        for g in plan.groups:
            net = TransferNet(block_size=plan.block_size, rank=g.rank, **NET)
            for b, c in zip(g.buckets, ctx[g.name], strict=True):
                delta, attn, z_t, z_s = net.apply(
                    {"params": p["nets"][g.name]}, c["tgt"], c["tgt_s"], c["src"],
                    c["src_s"], n_a=b.n_a, update_mode=mode)
                lo, _ = query_range(mode, b.n_a, b.n_t)
                for i, m in enumerate(b.modules):
                    if plan.patches_A:
                        total += jnp.sum(jnp.sin(
                            delta[i, : b.n_a - lo].reshape(-1, g.rank)[: m.d_in]))
                    if plan.patches_B:
                        total += jnp.sum(jnp.sin(
                            delta[i, b.n_a - lo:].reshape(-1, g.rank)[: m.d_out]))
                total += sum(jnp.sum(jnp.cos(x)) for x in (attn, z_t, z_s))
        return total

    got, g_got = jax.jit(jax.value_and_grad(lambda p: loss(p, True)))(params)
    want, g_want = jax.jit(jax.value_and_grad(lambda p: loss(p, False)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _target(cfg: ModelConfig):
    """q/v at r=4 on every layer, down_proj at r=2 on layers 1 and 3 (padded in the stack)."""
    a = random_lora(cfg, r=4, seed=1, target_modules=("q_proj", "v_proj"))
    b = random_lora(cfg, r=2, seed=2, target_modules=("down_proj",), layers=(1, 3))
    a.modules.update(b.modules)
    return a


def test_set_stacked_equals_stacking_the_patched_adapter():
    cfg = ModelConfig(**TINY)
    adapter = _target(cfg).to_jax(jnp.float32)
    stacked = stack_adapter(adapter, cfg)
    rng = np.random.default_rng(0)
    picked = [n for n in adapter if "down_proj" in n] + ["model.layers.2.self_attn.q_proj"]
    new = {n: jnp.asarray(rng.normal(size=adapter[n]["B"].shape), jnp.float32) for n in picked}
    patched = {n: {**m, "B": new.get(n, m["B"])} for n, m in adapter.items()}
    ours = set_stacked(stacked, "mlp.down_proj", "B", [1, 3],
                       jnp.stack([new["model.layers.1.mlp.down_proj"],
                                  new["model.layers.3.mlp.down_proj"]]))
    ours = set_stacked(ours, "self_attn.q_proj", "B", [2],
                       new["model.layers.2.self_attn.q_proj"][None])
    want = stack_adapter(patched, cfg)
    for kind in want:
        if want[kind] is None:
            assert ours[kind] is None
            continue
        for f in ("A", "B", "scale"):
            np.testing.assert_array_equal(ours[kind][f], want[kind][f], err_msg=f"{kind} {f}")
    all_q = jnp.ones((4, *stacked["q_proj"]["B"].shape[1:]))
    assert set_stacked(stacked, "self_attn.q_proj", "B", range(4), all_q)["q_proj"]["B"] is not \
        stacked["q_proj"]["B"]
    with pytest.raises(KeyError, match="no self_attn.k_proj"):
        set_stacked(stacked, "self_attn.k_proj", "B", [0], all_q[:1])


@pytest.mark.parametrize("mode", ["b_only", "ab_joint"])  # ab_joint patches A as a_only
def test_window_gradients_equal_for_scanned_and_unrolled_bases(mode):
    cfg = ModelConfig(**TINY)
    target = _target(cfg)
    source = random_adapter(3, 24, 40, 4, modules=("q_proj", "v_proj", "down_proj"), seed=3,
                            kv_dim=8, rank_overrides={"down_proj": 2})
    plan = build_plan(target, [source], block_size=8, update_mode=mode)
    ctx = build_contexts(plan, target, [source])
    params = _perturbed(init_fusion_params(plan, ctx, key=jax.random.PRNGKey(1), **NET))
    st = FuseStatics(plan=plan, model=cfg, net=TransferNetConfig(**NET),
                     rdm=RDMConfig(num_projections=8), optim=OptimizerConfig(lr=1e-3), steps=4)
    base = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, 1, 10)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "labels": np.where(np.arange(10) < 4, -100, ids).astype(np.int32)}
    weights, key = jnp.asarray([0.5, 0.5]), jax.random.PRNGKey(9)
    out = {}
    for name, b in (("loop", base), ("scan", stack_layers(base))):
        frozen = {"base": b, "adapter": target.to_jax(jnp.float32), "contexts": ctx}
        out[name] = jax.jit(loss_and_grads, static_argnames="st")(
            params, frozen, batch, weights, key, st=st)
    (g_loop, m_loop), (g_scan, m_scan) = out["loop"], out["scan"]
    for k in ("loss", "lm_loss", "rdm"):
        np.testing.assert_allclose(m_scan[k], m_loop[k], rtol=1e-5, err_msg=k)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_scan["alpha"])) > 0
    # The group-stacked factors are run_networks' per-module ones.
    frozen = {"adapter": target.to_jax(jnp.float32), "contexts": ctx}
    per_module, _, _ = jax.jit(run_networks, static_argnums=2)(params, frozen, st)
    stacked, _, _ = jax.jit(group_factors, static_argnums=2)(params, frozen, st)
    assert set(per_module) == set(stacked) == ({"B"} if mode == "b_only" else
                                              {"A"} if mode == "a_only" else {"A", "B"})
    for f in stacked:
        for n, v in split_groups(stacked[f], plan).items():
            np.testing.assert_array_equal(v, per_module[f][n])
    assert set(patch_factors(frozen["adapter"], per_module)) == set(frozen["adapter"])


def test_packed_networks_give_the_same_deltas_and_round_trip(interleaved):
    """`pack_nets` (the step's layout) stacks same-shaped groups; unpacking returns the
    per-group trees exactly, the deltas are the same, and the specs gain a leading axis."""
    from flax import linen as nn

    from hfjax.fusion.network import group_clusters, nets_of, pack_nets, unpack_nets
    from hfjax.sharding import fusion_logical_specs, packed_specs

    plan, ctx, params = interleaved
    clusters = group_clusters(plan)
    assert any(len(c) > 1 for c in clusters)  # k and v share shapes: one stacked cluster
    packed = {"clusters": pack_nets(params["nets"], plan), "alpha": params["alpha"]}
    assert len(packed["clusters"]) == len(clusters)
    back = unpack_nets(packed["clusters"], plan)
    assert list(back) == [g.name for g in plan.groups]
    for g in plan.groups:
        for a, b in zip(jax.tree.leaves(back[g.name]), jax.tree.leaves(params["nets"][g.name]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(nets_of(packed, plan)) == jax.tree.structure(params["nets"])
    run = jax.jit(lambda p: predict_group_deltas(p, ctx, plan, **NET)[:2])
    for x, y in zip(jax.tree.leaves(run(packed)), jax.tree.leaves(run(params)), strict=True):
        np.testing.assert_array_equal(x, y)
    boxed = init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), boxed=True, **NET)
    specs = packed_specs(fusion_logical_specs(boxed), plan)
    shapes = jax.eval_shape(lambda n: pack_nets(n, plan), nn.unbox(boxed)["nets"])
    for spec, shape in zip(jax.tree.leaves(specs["clusters"], is_leaf=lambda s: isinstance(
            s, jax.sharding.PartitionSpec)), jax.tree.leaves(shapes), strict=True):
        assert len(spec) <= len(shape.shape)
    stacked = next(c for c in clusters if len(c) > 1)
    name = "+".join(g.name for g in stacked)
    kernel = packed["clusters"][name]["encoder"]["proj_row"]["kernel"]
    assert kernel.shape[0] == len(stacked)
    assert specs["clusters"][name]["encoder"]["proj_row"]["kernel"][0] is None


def test_a_group_of_mixed_shapes_keeps_per_module_factors():
    """A hand-made plan may put modules of different shapes in one group (the bench does):
    its factors are a tuple of per-module arrays, and the scanned and unrolled windows agree."""
    from hfjax.fusion.plan import Bucket, FusionPlan, Group, ModuleEntry

    cfg = ModelConfig(**TINY)
    target = _target(cfg)
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
             "model.layers.3.self_attn.v_proj"]
    r, bs, n_a, n_b, n_s = 2, 16, 3, 3, 4
    mods = tuple(ModuleEntry(
        name=n, layer=int(n.split(".")[2]), suffix=n.split(".", 3)[3],
        module_type=n.rsplit(".", 1)[-1], d_out=target.modules[n].B.shape[0],
        d_in=target.modules[n].A.shape[1], rank=r, sources=((0, n),), n_a=n_a, n_b=n_b,
        n_src_tokens=n_s) for n in names)
    assert len({(m.d_in, m.d_out) for m in mods}) > 1
    plan = FusionPlan(block_size=bs, groups=(Group("mixed_r2", "mixed", r,
                                                   (Bucket(mods, n_a, n_b, n_a + n_b, n_s),)),),
                      layer_maps=({i: i for i in range(4)},), source_names=("s",), unfused=(),
                      target_layers=4, source_layers=(4,))
    # rank 2 everywhere: the q/v modules of the r=4 target are cut to their first 2 ranks
    for n in names:
        m = target.modules[n]
        target.modules[n] = dataclasses.replace(m, A=m.A[:r], B=m.B[:, :r])
    rng = np.random.default_rng(5)
    F = bs * r
    ctx = {"mixed_r2": [{"tgt": rng.normal(size=(3, n_a + n_b, F)).astype(np.float32),
                         "tgt_s": np.abs(rng.normal(size=(3, n_a + n_b, r))).astype(np.float32),
                         "src": rng.normal(size=(3, n_s, F)).astype(np.float32),
                         "src_s": np.abs(rng.normal(size=(3, n_s, r))).astype(np.float32)}]}
    params = _perturbed(init_fusion_params(plan, ctx, key=jax.random.PRNGKey(2), **NET))
    st = FuseStatics(plan=plan, model=cfg, net=TransferNetConfig(**NET),
                     rdm=RDMConfig(num_projections=8), optim=OptimizerConfig(lr=1e-3), steps=4)
    frozen = {"adapter": target.to_jax(jnp.float32), "contexts": ctx}
    stacked, _, _ = jax.jit(group_factors, static_argnums=2)(params, frozen, st)
    assert isinstance(stacked["B"]["mixed_r2"], tuple)
    assert [b.shape for b in stacked["B"]["mixed_r2"]] == [target.modules[n].B.shape
                                                         for n in names]
    base = init_params(cfg, jax.random.PRNGKey(0))
    ids = rng.integers(0, cfg.vocab_size, (1, 1, 8)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
    out = [jax.jit(loss_and_grads, static_argnames="st")(
        params, {**frozen, "base": b}, batch, jnp.ones((1,)), jax.random.PRNGKey(3), st=st)
        for b in (base, stack_layers(base))]
    np.testing.assert_allclose(out[1][1]["loss"], out[0][1]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][0]), jax.tree.leaves(out[0][0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
