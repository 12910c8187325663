"""Transfer network (docs/algorithm.md §4) and fused update (docs/algorithm.md §5): init, shapes,
gradients, axes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.fusion import (
    FusionError,
    TransferNet,
    average_rdm,
    build_contexts,
    build_plan,
    fused_B,
    init_fusion_params,
    net_param_count,
    param_count,
    predict_delta_B,
)
from hfjax.testing.adapters import random_adapter

NET = {"embed_dim": 32, "num_heads": 4, "max_pos": 64, "mu_gate": 0.1, "gate": "svd"}


@pytest.fixture(scope="module")
def setup():
    t = random_adapter(4, 20, 24, 4, modules=("q_proj", "down_proj"), seed=0)
    a = random_adapter(3, 12, 18, 4, modules=("q_proj", "down_proj"), seed=1)
    b = random_adapter(4, 28, 16, 4, modules=("q_proj",), seed=2)
    plan = build_plan(t, [a, b], block_size=16)
    ctx = build_contexts(plan, t, [a, b])
    params = init_fusion_params(plan, ctx, key=jax.random.key(0), alpha_init=0.3, **NET)
    target_B = {n: jnp.asarray(m.B) for n, m in t.modules.items()}
    return plan, ctx, params, target_B


@pytest.fixture(scope="module")
def predict(setup):
    """``predict_delta_B`` jitted once for the setup's plan (contexts are an argument)."""
    plan = setup[0]
    return jax.jit(lambda p, c: predict_delta_B(p, c, plan, **NET))


def perturbed(params, seed=1):
    """Params whose last decoder layer is no longer zero."""
    nets = jax.tree_util.tree_map(lambda x: x, params["nets"])
    for i, g in enumerate(sorted(nets)):
        d = dict(nets[g]["decoder_out"])
        d["kernel"] = 0.1 * jax.random.normal(jax.random.key(seed + i), d["kernel"].shape)
        nets[g] = {**nets[g], "decoder_out": d}
    return {"nets": nets, "alpha": params["alpha"]}


def test_param_tree_and_init(setup):
    plan, _, params, _ = setup
    assert set(params) == {"nets", "alpha"}
    assert set(params["nets"]) == set(params["alpha"]) == {g.name for g in plan.groups}
    p = params["nets"]["q_proj_r4"]
    assert set(p) == {"encoder", "pos_embed", "attention", "decoder_hidden", "decoder_out"}
    assert set(p["encoder"]) == {"input_norm", "proj_row", "proj_col", "gate_hidden",
                                 "gate_out", "fusion_norm"}
    F, E = 16 * 4, 32
    assert p["encoder"]["proj_row"]["kernel"].shape == (F, E)
    assert p["encoder"]["gate_hidden"]["kernel"].shape == (4, E // 4)
    assert p["decoder_out"]["kernel"].shape == (E, F)
    assert p["pos_embed"]["embedding"].shape == (64, E)
    np.testing.assert_array_equal(p["decoder_out"]["kernel"], 0.0)
    np.testing.assert_array_equal(p["decoder_out"]["bias"], 0.0)
    np.testing.assert_array_equal(p["encoder"]["input_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(p["encoder"]["fusion_norm"]["bias"], 0.0)
    k = np.asarray(p["encoder"]["proj_row"]["kernel"])
    bound = np.sqrt(6.0 / (F + E))  # xavier uniform
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    np.testing.assert_array_equal(p["attention"]["q_proj"]["bias"], 0.0)
    assert 0.8 < float(jnp.std(p["pos_embed"]["embedding"])) < 1.2  # N(0, 1)
    assert not np.allclose(p["encoder"]["proj_row"]["kernel"],
                           params["nets"]["down_proj_r4"]["encoder"]["proj_row"]["kernel"])
    assert all(a.dtype == jnp.float32 and float(a) == pytest.approx(0.3)
               for a in params["alpha"].values())
    n_groups = len(plan.groups)
    assert param_count(params) == n_groups * (net_param_count(16, 4, 32, 4, 64) + 1)


def test_paper_scale_parameter_count():
    n = net_param_count(4096, 8, 1024, 8, 4096)  # docs/algorithm.md §4: ≈110M per net, ≈773M for 7
    assert 109e6 < n < 111e6 and 770e6 < 7 * n < 776e6


def test_delta_B_is_exactly_zero_at_init(setup, predict):
    plan, ctx, params, target_B = setup
    dB, aux = predict(params, ctx)
    assert set(dB) == set(plan.fused_modules)
    for g in plan.groups:
        for m in g.modules:
            assert dB[m.name].shape == (m.d_out, m.rank) and dB[m.name].dtype == jnp.float32
            assert not np.any(np.asarray(dB[m.name]))
    new = fused_B(target_B, dB, params["alpha"], plan)
    assert set(new) == set(plan.fused_modules)
    for n, b in new.items():
        np.testing.assert_array_equal(b, target_B[n])
    for g in plan.groups:
        for b, a in zip(g.buckets, aux[g.name], strict=True):
            M = len(b.modules)
            assert a["z_t"].shape == (M, b.n_t, 32) and a["z_s"].shape == (M, b.n_s, 32)
            assert a["attn"].shape == (M, b.n_b, b.n_s)
            np.testing.assert_allclose(a["attn"].sum(-1), 1.0, rtol=1e-5)


def test_fused_B_is_B_plus_alpha_delta(setup, predict):
    plan, ctx, params, target_B = setup
    p = perturbed(params)
    dB, _ = predict(p, ctx)
    alpha = {g: jnp.float32(0.5 + i) for i, g in enumerate(p["alpha"])}
    new = fused_B(target_B, dB, alpha, plan)
    for g in plan.groups:
        for m in g.modules:
            assert np.any(np.asarray(dB[m.name]))
            np.testing.assert_allclose(new[m.name], target_B[m.name] + alpha[g.name] * dB[m.name],
                                       rtol=1e-6)


def test_gradients_flow_to_nets_and_alpha(setup):
    plan, ctx, params, target_B = setup

    def loss(p):
        dB, aux = predict_delta_B(p, ctx, plan, **NET)
        new = fused_B(target_B, dB, p["alpha"], plan)
        lm = sum(jnp.sum(jnp.sin(b) ** 2) for b in new.values())
        return lm + 0.005 * average_rdm(aux, jax.random.key(3), num_projections=64)

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    # At init ΔB = 0: the LM part reaches the last layer but not alpha (d/dalpha = ΔB = 0).
    _, g0 = value_and_grad(params)
    for name in params["nets"]:
        assert np.any(np.asarray(g0["nets"][name]["decoder_out"]["kernel"]))
        assert float(g0["alpha"][name]) == 0.0
    # After one perturbation of the last layer, everything gets gradient.
    p = perturbed(params)
    val, g = value_and_grad(p)
    assert np.isfinite(float(val))
    for name in p["nets"]:
        assert float(jnp.abs(g["alpha"][name])) > 0
        for path, leaf in jax.tree_util.tree_leaves_with_path(g["nets"][name]):
            assert np.any(np.asarray(leaf)), jax.tree_util.keystr(path)


def test_modules_of_a_bucket_are_independent(setup, predict):
    plan, ctx, params, _ = setup
    p = perturbed(params)
    bucket = plan.group("q_proj_r4").buckets[-1]
    assert len(bucket.modules) >= 2
    dB, aux = predict(p, ctx)
    c = {k: v.copy() for k, v in ctx["q_proj_r4"][-1].items()}
    for k in c:
        c[k][0] = np.random.default_rng(7).standard_normal(c[k][0].shape)
    other = {**ctx, "q_proj_r4": [*ctx["q_proj_r4"][:-1], c]}
    dB2, aux2 = predict(p, other)
    first, *rest = bucket.modules
    assert not np.allclose(dB[first.name], dB2[first.name])
    for m in rest:
        np.testing.assert_allclose(dB[m.name], dB2[m.name], rtol=1e-6, atol=1e-7)
    for k in ("z_t", "z_s", "attn"):
        np.testing.assert_allclose(aux["q_proj_r4"][-1][k][1:], aux2["q_proj_r4"][-1][k][1:],
                                   rtol=1e-6, atol=1e-7)


def test_open_gate_has_no_gate_params_and_differs(setup, predict):
    plan, ctx, params, _ = setup
    kw = {**NET, "gate": "open"}
    po = init_fusion_params(plan, ctx, key=jax.random.key(0), alpha_init=0.3, **kw)
    enc = po["nets"]["q_proj_r4"]["encoder"]
    assert "gate_hidden" not in enc and "gate_out" not in enc
    c = ctx["q_proj_r4"][0]
    n_a = plan.group("q_proj_r4").buckets[0].n_a
    args = (c["tgt"], c["tgt_s"], c["src"], c["src_s"])
    net_open = TransferNet(16, 4, embed_dim=32, num_heads=4, max_pos=64, gate="open")
    z_open = jax.jit(lambda p: net_open.apply({"params": p}, *args, n_a=n_a)[2])(
        po["nets"]["q_proj_r4"])
    _, aux = predict(params, ctx)
    assert not np.allclose(z_open, aux["q_proj_r4"][0]["z_t"])


def test_logical_axes_boxed_params(setup, predict):
    plan, ctx, params, _ = setup
    boxed = init_fusion_params(plan, ctx, key=jax.random.key(0), alpha_init=0.3, boxed=True,
                               **NET)
    specs = nn.get_partition_spec(boxed["nets"]["q_proj_r4"])
    assert tuple(specs["encoder"]["proj_row"]["kernel"]) == ("block", "embed")
    assert tuple(specs["encoder"]["proj_col"]["kernel"]) == ("block", "embed")
    assert tuple(specs["decoder_out"]["kernel"]) == ("mlp", "block")
    assert tuple(specs["encoder"]["gate_hidden"]["kernel"]) == ("lora_r", "gate_mlp")
    unboxed = nn.unbox(boxed["nets"])
    for a, b in zip(jax.tree_util.tree_leaves(unboxed),
                    jax.tree_util.tree_leaves(params["nets"]), strict=True):
        np.testing.assert_array_equal(a, b)
    # Boxed params apply like plain ones (no mesh needed).
    net = TransferNet(16, 4, embed_dim=32, num_heads=4, max_pos=64)
    c = ctx["q_proj_r4"][0]
    n_a = plan.group("q_proj_r4").buckets[0].n_a
    z_boxed = jax.jit(lambda p: net.apply({"params": p}, c["tgt"], c["tgt_s"], c["src"],
                                          c["src_s"], n_a=n_a)[2])(boxed["nets"]["q_proj_r4"])
    _, aux = predict(params, ctx)
    np.testing.assert_allclose(z_boxed, aux["q_proj_r4"][0]["z_t"], rtol=1e-6, atol=1e-6)


def test_refuses_bad_shapes_and_config(setup):
    plan, ctx, params, _ = setup
    c = ctx["q_proj_r4"][0]
    p = params["nets"]["q_proj_r4"]
    net = TransferNet(16, 4, embed_dim=32, num_heads=4, max_pos=64)
    with pytest.raises(FusionError, match="n_a"):
        net.apply({"params": p}, c["tgt"], c["tgt_s"], c["src"], c["src_s"], n_a=4)
    with pytest.raises(FusionError, match="max_pos"):
        TransferNet(16, 4, embed_dim=32, num_heads=4, max_pos=3).apply(
            {"params": p}, c["tgt"], c["tgt_s"], c["src"], c["src_s"], n_a=2)
    with pytest.raises(FusionError, match="max_pos"):
        init_fusion_params(plan, ctx, key=jax.random.key(0), **{**NET, "max_pos": 3})
    with pytest.raises(FusionError, match="gate"):
        init_fusion_params(plan, ctx, key=jax.random.key(0), **{**NET, "gate": "closed"})
    with pytest.raises(FusionError, match="col_view"):
        TransferNet(16, 4, embed_dim=32, num_heads=4, max_pos=64, col_view="rows").apply(
            {"params": p}, c["tgt"], c["tgt_s"], c["src"], c["src_s"], n_a=2)
    with pytest.raises(FusionError, match="divisible"):
        init_fusion_params(plan, ctx, key=jax.random.key(0), **{**NET, "num_heads": 5})
