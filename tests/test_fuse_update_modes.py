"""The later release's ``update_mode`` (docs/algorithm.md §11): ΔA from the A^T tokens, A' = A +
α·ΔA.

Network level on synthetic adapters (what each mode decodes, un-blocking, b_only unchanged),
then end to end on the tiny zoo: the exported adapter with patched A loads in ``PeftModel``
and matches our forward.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hfjax
from bridge import load_adapter
from hfjax.fusion import (
    TransferNet,
    build_contexts,
    build_plan,
    fused_A,
    fused_B,
    init_fusion_params,
    predict_delta_B,
    predict_deltas,
)
from hfjax.testing.adapters import random_adapter
from hfjax.testing.zoo import tiny_fuse_config
from hfjax.training.fuse_loop import export, prepare, reuse_networks, run_fusion, statics_from
from hfjax.training.fuse_step import patch_factors, patched_adapter, run_networks

NET = {"embed_dim": 32, "num_heads": 4, "max_pos": 64, "mu_gate": 0.1, "gate": "svd"}
BS, R = 16, 4


@pytest.fixture(scope="module")
def setup():
    # q_proj: d_in 20, d_out 24 -> n_a = n_b = 2 with padding rows to cut on un-blocking.
    t = random_adapter(4, 20, 24, R, modules=("q_proj", "down_proj"), seed=0)
    a = random_adapter(3, 12, 18, R, modules=("q_proj", "down_proj"), seed=1)
    plans = {mode: build_plan(t, [a], block_size=BS, update_mode=mode)
             for mode in ("b_only", "a_only", "ab_joint")}
    ctx = build_contexts(plans["b_only"], t, [a])
    params = init_fusion_params(plans["b_only"], ctx, key=jax.random.key(0), **NET)
    nets = {}
    for i, (g, p) in enumerate(params["nets"].items()):  # a non-zero last decoder layer
        k = 0.1 * jax.random.normal(jax.random.key(7 + i), p["decoder_out"]["kernel"].shape)
        nets[g] = {**p, "decoder_out": {**p["decoder_out"], "kernel": k}}
    return t, plans, ctx, {"nets": nets, "alpha": params["alpha"]}


def _apply(params, c, mode, n_a):
    net = TransferNet(block_size=BS, rank=R, embed_dim=32, num_heads=4, max_pos=64)
    return net.apply({"params": params}, c["tgt"], c["tgt_s"], c["src"], c["src_s"], n_a=n_a,
                     update_mode=mode)


def test_each_mode_decodes_its_tokens(setup):
    _, plans, ctx, params = setup
    g = plans["b_only"].groups[0]
    (b,) = g.buckets
    c, p = ctx[g.name][0], params["nets"][g.name]
    outs = {m: _apply(p, c, m, b.n_a) for m in ("b_only", "a_only", "ab_joint")}
    M, F = len(b.modules), BS * R
    assert outs["b_only"][0].shape == (M, b.n_b, F)
    assert outs["a_only"][0].shape == (M, b.n_a, F)
    assert outs["ab_joint"][0].shape == (M, b.n_t, F)
    # Queries are independent: ab_joint = [a_only rows, b_only rows], and the encodings agree.
    joint = np.concatenate([outs["a_only"][0], outs["b_only"][0]], axis=1)
    np.testing.assert_allclose(outs["ab_joint"][0], joint, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs["ab_joint"][1][:, b.n_a:], outs["b_only"][1], atol=1e-6)
    np.testing.assert_array_equal(outs["a_only"][2], outs["b_only"][2])
    assert np.abs(np.asarray(outs["a_only"][0])).max() > 1e-3


def test_b_only_does_no_extra_work(setup):
    _, plans, ctx, params = setup
    g = plans["b_only"].groups[0]
    (b,) = g.buckets
    c, p = ctx[g.name][0], params["nets"][g.name]
    flops = {m: jax.jit(lambda p, c, m=m: _apply(p, c, m, b.n_a)).lower(p, c).cost_analysis()
             ["flops"] for m in ("b_only", "a_only", "ab_joint")}
    assert flops["b_only"] < flops["ab_joint"] and flops["a_only"] < flops["ab_joint"], flops


def test_b_only_is_unchanged(setup):
    """b_only: the default call and the old un-blocking, bit for bit; no ΔA at all."""
    _, plans, ctx, params = setup
    plan = plans["b_only"]
    d_a, d_b, _ = predict_deltas(params, ctx, plan, **NET)
    assert d_a == {} and set(d_b) == set(plan.fused_modules)
    for g in plan.groups:
        for b, c in zip(g.buckets, ctx[g.name], strict=True):
            net = TransferNet(block_size=BS, rank=R, embed_dim=32, num_heads=4, max_pos=64)
            delta = net.apply({"params": params["nets"][g.name]}, c["tgt"], c["tgt_s"],
                              c["src"], c["src_s"], n_a=b.n_a)  # no update_mode: the default
            for i, m in enumerate(b.modules):
                old = delta[0][i].astype(jnp.float32).reshape(-1, R)[: m.d_out]
                np.testing.assert_array_equal(d_b[m.name], old)
    d_b2, _ = predict_delta_B(params, ctx, plan, **NET)
    for n in d_b:
        np.testing.assert_array_equal(d_b2[n], d_b[n])


def test_delta_A_is_unblocked_and_transposed(setup):
    t, plans, ctx, params = setup
    d_a, d_b, _ = predict_deltas(params, ctx, plans["ab_joint"], **NET)
    d_a_only, d_b_only, _ = predict_deltas(params, ctx, plans["a_only"], **NET)
    d_b_b, _ = predict_delta_B(params, ctx, plans["b_only"], **NET)
    assert d_b_only == {} and set(d_a_only) == set(d_a) == set(plans["a_only"].fused_modules)
    for g in plans["ab_joint"].groups:
        (b,) = g.buckets
        raw = _apply(params["nets"][g.name], ctx[g.name][0], "ab_joint", b.n_a)[0]
        for i, m in enumerate(b.modules):
            assert d_a[m.name].shape == (R, m.d_in) == t.modules[m.name].A.shape
            want = np.asarray(raw[i, : b.n_a]).reshape(-1, R)[: m.d_in].T
            np.testing.assert_allclose(d_a[m.name], want, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(d_a_only[m.name], d_a[m.name], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(d_b[m.name], d_b_b[m.name], rtol=1e-5, atol=1e-6)
    target_A = {n: jnp.asarray(m.A) for n, m in t.modules.items()}
    new_A = fused_A(target_A, d_a, params["alpha"], plans["ab_joint"])
    n0 = plans["ab_joint"].fused_modules[0]
    alpha = params["alpha"][plans["ab_joint"].groups[0].name]
    np.testing.assert_allclose(new_A[n0], target_A[n0] + alpha * d_a[n0], rtol=1e-6)
    new_B = fused_B({n: jnp.asarray(m.B) for n, m in t.modules.items()}, d_b, params["alpha"],
                    plans["ab_joint"])
    assert set(new_B) == set(new_A)


def test_patched_adapter_replaces_A_and_B():
    adapter = {"m": {"A": jnp.zeros((2, 3)), "B": jnp.zeros((4, 2)), "scale": 1.0},
               "n": {"A": jnp.zeros((2, 3)), "B": jnp.zeros((4, 2)), "scale": 1.0}}
    out = patch_factors(adapter, {"A": {"m": jnp.ones((2, 3))}})
    assert float(out["m"]["A"].sum()) == 6 and float(out["m"]["B"].sum()) == 0
    assert out["n"] is adapter["n"]
    both = patched_adapter(adapter, {"m": jnp.ones((4, 2))}, {"m": jnp.ones((2, 3))})
    assert float(both["m"]["A"].sum()) == 6 and float(both["m"]["B"].sum()) == 8


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo()  # q/v sources, q/k/v target (k_proj unfused)


def _config(zoo, out, mode):
    cfg = tiny_fuse_config(zoo, out)
    cfg.fusion.update_mode = mode
    cfg.train.epochs = 1
    cfg.train.max_steps = 2
    return cfg


def _perturbed(params):
    """Networks whose last decoder layer is not zero (so that ΔA, ΔB are not zero)."""
    nets = {}
    for i, (g, p) in enumerate(params["nets"].items()):
        k = 0.05 * jax.random.normal(jax.random.key(3 + i), p["decoder_out"]["kernel"].shape)
        nets[g] = {**p, "decoder_out": {**p["decoder_out"], "kernel": k}}
    return {**params, "nets": nets}


def _params(cfg, inp):
    f = cfg.fusion
    return init_fusion_params(inp.plan, inp.contexts, key=jax.random.key(0),
                              embed_dim=f.embed_dim, num_heads=f.num_heads, max_pos=f.max_pos,
                              mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init)


@pytest.fixture(scope="module")
def runs(zoo, tmp_path_factory):
    """ab_joint: a short real run (the step trains through A and B); a_only: the export of
    networks with a random last layer (no step to compile: the export path is the same)."""
    cfg = _config(zoo, tmp_path_factory.mktemp("ab_joint"), "ab_joint")
    res = run_fusion(cfg, progress=False)
    inp = prepare(cfg)
    params = reuse_networks(_params(cfg, inp), res.output_dir)
    params = {**params, "alpha": {g: jnp.float32(a) for g, a in res.report["alpha"].items()}}
    out = {"ab_joint": (res.adapter_dir, res.report, cfg, inp, params)}

    cfg = _config(zoo, tmp_path_factory.mktemp("a_only"), "a_only")
    inp = prepare(cfg)
    params = _perturbed(_params(cfg, inp))
    frozen = {"adapter": inp.target.to_jax(jnp.float32), "contexts": inp.contexts}
    st = statics_from(cfg, inp.plan, inp.model_cfg)
    adapter_dir, report = export(cfg, inp, params, frozen, st, tmp_path_factory.mktemp("a_out"))
    out["a_only"] = (adapter_dir, report, cfg, inp, params)
    return out


def test_a_only_patches_A_and_leaves_B(zoo, runs):
    adapter_dir, report, *_ = runs["a_only"]
    target, fused = load_adapter(zoo["target_adapter"]), load_adapter(adapter_dir)
    fused_names = {m["name"] for g in report["plan"]["groups"]
                   for b in g["buckets"] for m in b["modules"]}
    assert set(report["alpha_times_delta_A_fro"]) == fused_names
    assert report["alpha_times_delta_B_fro"] == {} and report["update_mode"] == "a_only"
    for name, m in target.modules.items():
        np.testing.assert_array_equal(fused.modules[name].B, m.B)
        if name in fused_names:
            assert fused.modules[name].A.dtype == np.float32
            assert not np.array_equal(fused.modules[name].A, m.A), name
        else:
            np.testing.assert_array_equal(fused.modules[name].A, m.A)


def test_ab_joint_patches_both(zoo, runs):
    adapter_dir, report, *_ = runs["ab_joint"]
    target, fused = load_adapter(zoo["target_adapter"]), load_adapter(adapter_dir)
    fused_names = set(report["alpha_times_delta_A_fro"])
    assert fused_names == set(report["alpha_times_delta_B_fro"]) and fused_names
    for name in fused_names:  # trained: the networks' last layer moved off zero
        assert not np.array_equal(fused.modules[name].A, target.modules[name].A), name
        assert not np.array_equal(fused.modules[name].B, target.modules[name].B), name


@pytest.mark.parametrize("mode", ["a_only", "ab_joint"])
def test_export_matches_our_forward_and_peft(zoo, runs, mode):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    adapter_dir, _, cfg, inp, params = runs[mode]
    st = statics_from(cfg, inp.plan, inp.model_cfg)
    frozen = {"adapter": inp.target.to_jax(jnp.float32), "contexts": inp.contexts}
    factors, _, _ = jax.jit(run_networks, static_argnums=2)(params, frozen, st)
    assert set(factors) == ({"A"} if mode == "a_only" else {"A", "B"})
    model = hfjax.from_pretrained(zoo["base_llama"], dtype="float32")
    ids = np.arange(5, 29)[None]
    ours = np.asarray(model(ids, adapter=patch_factors(frozen["adapter"], factors)))
    exported = np.asarray(model(ids, adapter=load_adapter(adapter_dir)))
    np.testing.assert_allclose(exported, ours, atol=1e-5)
    assert np.abs(exported - np.asarray(model(ids, adapter=inp.target))).max() > 1e-4

    base = transformers.AutoModelForCausalLM.from_pretrained(
        zoo["base_llama"], dtype="float32", attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids)).logits.numpy()
    err = float(np.abs(exported - ref).max())
    print(f"{mode}: PeftModel vs ours max |logit diff| {err:.2e}")
    assert err <= 1e-4


def test_dry_run_shows_each_sources_layer_map(zoo, tmp_path, capsys):
    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.fusion.layer_alignment = "uniform"
    cfg.fusion.transfer_ratio = 0.75
    cfg.fusion.update_mode = "ab_joint"
    run_fusion(cfg, dry_run=True, progress=False)
    out = capsys.readouterr().out
    # target 4 layers; qwen 3: overlap 3, keep 2 -> (0, 0), (3, 2); mistral 5: overlap 4,
    # keep 3 -> steps 3/2 and 4/2: (0, 0), (2, 2), (3, 4).
    assert "Layer alignment 'uniform'" in out and "Update mode 'ab_joint'" in out
    assert "pairs (target:source): 0:0, 3:2" in out
    assert "pairs (target:source): 0:0, 2:2, 3:4" in out


def test_plan_keeps_its_modes_through_prepare(zoo, tmp_path):
    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.fusion.layer_alignment = "head"
    cfg.fusion.update_mode = "a_only"
    plan = prepare(cfg).plan
    assert plan.layer_alignment == "head" and plan.update_mode == "a_only"
    assert plan.layer_maps[0] == {0: 0, 1: 1, 2: 2}  # qwen: 3 layers from the bottom
    assert dataclasses.replace(plan, update_mode="b_only") != plan
