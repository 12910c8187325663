"""Source controls (zero / noise / mismatch) and the "does the network read its sources?" probe."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.errors import UserError
from hfjax.fusion import build_contexts, build_plan, init_fusion_params, svd_descriptor
from hfjax.fusion.controls import (
    apply_source_control,
    module_derangement,
    rolled_sources,
    source_control_of,
    source_segments,
    swapped_sources,
)
from hfjax.fusion.probe import probe_markdown, probe_sources
from hfjax.testing.adapters import random_adapter

BS = 4
NET = dict(embed_dim=16, num_heads=2, max_pos=32, mu_gate=0.1, gate="svd")


@pytest.fixture(scope="module")
def setup():
    # Target of 4 layers; sources of 4 and 3 layers (tail-aligned: layer 0 of the target gets
    # only source 0, so the groups have two buckets), other hidden sizes.
    t = random_adapter(4, 10, 14, 2, modules=("q_proj", "down_proj"), seed=0)
    a = random_adapter(4, 6, 9, 2, modules=("q_proj", "down_proj"), seed=1)
    b = random_adapter(3, 12, 7, 2, modules=("q_proj", "down_proj"), seed=2)
    plan = build_plan(t, [a, b], block_size=BS)
    return plan, build_contexts(plan, t, [a, b]), [a, b], t


def _cells(ctx):
    return [(g, bi, c) for g, buckets in ctx.items() for bi, c in enumerate(buckets)]


def _rows(x):
    return {r.tobytes() for r in np.asarray(x, np.float32).reshape(-1, x.shape[-1])}


def _descriptor_ok(plan, c, rank):
    M, n_s, _ = c["src"].shape
    want = svd_descriptor(c["src"].reshape(M * n_s, -1), BS, rank).reshape(M, n_s, rank)
    np.testing.assert_array_equal(c["src_s"], want)


def _targets_untouched(ctx, new):
    for (_, _, c), (_, _, d) in zip(_cells(ctx), _cells(new), strict=True):
        np.testing.assert_array_equal(d["tgt"], c["tgt"])
        np.testing.assert_array_equal(d["tgt_s"], c["tgt_s"])


def test_plan_has_several_buckets(setup):
    plan, ctx, _, _ = setup
    assert all(len(g.buckets) == 2 for g in plan.groups)


def test_noise_keeps_token_norms_and_changes_every_token(setup):
    plan, ctx, _, _ = setup
    new = apply_source_control(ctx, plan, "noise", seed=3)
    for g, bi, c in _cells(ctx):
        d = new[g][bi]
        src, noisy = c["src"], d["src"]
        assert noisy.shape == src.shape and noisy.dtype == src.dtype
        np.testing.assert_allclose(np.linalg.norm(noisy, axis=-1), np.linalg.norm(src, axis=-1),
                                   rtol=1e-6)
        assert np.all(np.linalg.norm(src, axis=-1) > 0)
        assert np.all(np.abs(noisy - src).max(axis=-1) > 1e-3)  # every token changed
        np.testing.assert_array_equal(noisy == 0, src == 0)  # block padding stays zero
        _descriptor_ok(plan, d, plan.group(g).rank)
    _targets_untouched(ctx, new)
    again = apply_source_control(ctx, plan, "noise", seed=3)
    other = apply_source_control(ctx, plan, "noise", seed=4)
    g0 = plan.groups[0].name
    np.testing.assert_array_equal(again[g0][0]["src"], new[g0][0]["src"])
    assert not np.array_equal(other[g0][0]["src"], new[g0][0]["src"])


def test_mismatch_keeps_multiset_and_moves_every_module(setup):
    plan, ctx, _, _ = setup
    new = apply_source_control(ctx, plan, "mismatch", seed=0)
    # One pool: both groups have rank 2, so all source tokens have width 8.
    before = np.concatenate([c["src"].reshape(-1, BS * 2) for _, _, c in _cells(ctx)])
    after = np.concatenate([c["src"].reshape(-1, BS * 2) for _, _, c in _cells(new)])
    np.testing.assert_array_equal(np.unique(before, axis=0), np.unique(after, axis=0))
    np.testing.assert_array_equal(np.sort(before, axis=0), np.sort(after, axis=0))
    assert len(_rows(before)) == before.shape[0]  # all distinct, so the check below is sharp
    for g, bi, c in _cells(ctx):
        d = new[g][bi]
        assert d["src"].shape == c["src"].shape
        for i in range(c["src"].shape[0]):
            assert not (_rows(d["src"][i]) & _rows(c["src"][i])), (g, bi, i)
        _descriptor_ok(plan, d, plan.group(g).rank)
    _targets_untouched(ctx, new)


def test_module_derangement():
    rng = np.random.default_rng(0)
    owner = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3])
    for _ in range(20):
        perm, ok = module_derangement(owner, rng)
        assert ok and sorted(perm) == list(range(owner.size))
        assert np.all(owner[perm] != owner)
    dominant = np.array([0, 0, 0, 0, 1, 2])  # owner 0 holds more than half: impossible
    perm, ok = module_derangement(dominant, rng)
    assert not ok and sorted(perm) == list(range(6)) and np.all(perm != np.arange(6))


def test_mismatch_warns_when_no_derangement_exists():
    t = random_adapter(1, 10, 14, 2, modules=("q_proj",), seed=0)
    s = random_adapter(1, 6, 9, 2, modules=("q_proj",), seed=1)
    plan = build_plan(t, [s], block_size=BS)
    ctx = build_contexts(plan, t, [s])
    with pytest.warns(UserWarning, match="more than half"):
        new = apply_source_control(ctx, plan, "mismatch", seed=0)
    c, d = ctx["q_proj_r2"][0], new["q_proj_r2"][0]
    assert not np.array_equal(c["src"], d["src"])  # moved within the module's own context
    np.testing.assert_array_equal(np.sort(c["src"][0], axis=0), np.sort(d["src"][0], axis=0))


def test_zero_equals_zero_sources(setup):
    plan, ctx, _, _ = setup
    old = {g: [{**c, "src": np.zeros_like(c["src"]), "src_s": np.zeros_like(c["src_s"])}
               for c in buckets] for g, buckets in ctx.items()}  # the old zero_sources code
    new = apply_source_control(ctx, plan, "zero")
    for (_, _, a), (_, _, b) in zip(_cells(old), _cells(new), strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
    none = apply_source_control(ctx, plan, "none")
    for (_, _, a), (_, _, b) in zip(_cells(ctx), _cells(none), strict=True):
        assert all(a[k] is b[k] for k in a)
    assert np.any(ctx[plan.groups[0].name][0]["src"])  # inputs untouched


def test_source_control_of_fields():
    def cfg(**f):
        return types.SimpleNamespace(fusion=types.SimpleNamespace(**f))

    assert source_control_of(cfg()) == "none"
    assert source_control_of(cfg(zero_sources=True)) == "zero"
    assert source_control_of(cfg(zero_sources=True, source_control="zero")) == "zero"
    assert source_control_of(cfg(zero_sources=False, source_control="noise")) == "noise"
    with pytest.raises(UserError, match="conflicts with fusion.source_control='noise'"):
        source_control_of(cfg(zero_sources=True, source_control="noise"))
    with pytest.raises(UserError, match="fusion.source_control='gauss': must be one of"):
        source_control_of(cfg(source_control="gauss"))
    from hfjax.configs.fuse import get_config

    c = get_config()
    assert source_control_of(c) == "none"
    c.fusion.source_control = "mismatch"
    assert source_control_of(c) == "mismatch"


def test_roll_and_swap(setup):
    plan, ctx, sources, _ = setup
    rolled = rolled_sources(ctx, plan)
    segs = source_segments(plan, sources)
    swapped = swapped_sources(ctx, plan, segs)
    for g in plan.groups:
        for b, c, r, s in zip(g.buckets, ctx[g.name], rolled[g.name], swapped[g.name],
                              strict=True):
            layers = [m.layer for m in b.modules]
            assert layers == sorted(layers)
            for i, m in enumerate(b.modules):
                np.testing.assert_array_equal(r["src"][i], c["src"][i - 1])  # layer i-1 -> i
                np.testing.assert_array_equal(r["src_s"][i], c["src_s"][i - 1])
                seg = segs[m.name]
                assert sum(seg) == c["src"].shape[1]
                if len(seg) == 2:
                    want = np.concatenate([c["src"][i][seg[0]:], c["src"][i][:seg[0]]])
                    np.testing.assert_array_equal(s["src"][i], want)
                    assert not np.array_equal(s["src"][i], c["src"][i])
                else:
                    np.testing.assert_array_equal(s["src"][i], c["src"][i])
    _targets_untouched(ctx, rolled)
    _targets_untouched(ctx, swapped)


def _source_reading_params(plan, ctx):
    """Networks with every leaf random, so ΔB depends on the sources (fresh ones give 0)."""
    params = init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), alpha_init=0.5, **NET)
    leaves, tree = jax.tree.flatten(params["nets"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return {"nets": jax.tree.unflatten(tree, leaves), "alpha": params["alpha"]}


def test_probe_identity_is_zero_and_noise_is_not(setup):
    plan, ctx, sources, target = setup
    params = _source_reading_params(plan, ctx)
    target_B = {m: target.modules[m].B for m in plan.fused_modules}

    def nll(new_B):  # any function of the fused adapter will do
        return float(sum(np.sum(np.square(b)) for b in new_B.values()))

    rows = probe_sources(params, ctx, plan, net_kwargs=NET, sources=sources, target_B=target_B,
                         nll_fn=nll, perturbations=["none", "zero", "noise", "swap", "roll",
                                                    "mismatch"], seed=0)
    by = {(r["perturbation"], r["group"]): r for r in rows}
    groups = [g.name for g in plan.groups]
    assert set(by) == {(p, g) for p in ("none", "zero", "noise", "swap", "roll", "mismatch")
                       for g in [*groups, "all"]}
    for g in [*groups, "all"]:
        assert by[("none", g)]["rel_dB_change"] == 0.0
        assert by[("none", g)]["dB_fro"] > 0
        for p in ("zero", "noise", "swap", "roll", "mismatch"):
            assert by[(p, g)]["rel_dB_change"] > 1e-3, (p, g)
    assert by[("none", "all")]["nll_change"] == 0.0
    assert abs(by[("noise", "all")]["nll_change"]) > 0
    assert by[("noise", "all")]["nll_ref"] == by[("none", "all")]["nll"]
    md = probe_markdown(rows)
    assert md.splitlines()[0].startswith("| perturbation |") and "ΔNLL" in md
    assert len(md.splitlines()) == 2 + 6 and "| noise |" in md


def test_probe_default_and_refusals(setup):
    plan, ctx, sources, _ = setup
    params = _source_reading_params(plan, ctx)
    rows = probe_sources(params, ctx, plan, net_kwargs=NET, sources=sources)
    assert list(dict.fromkeys(r["perturbation"] for r in rows)) == ["zero", "noise", "swap",
                                                                    "roll"]
    assert all(r["nll"] is None for r in rows if r["group"] == "all")
    assert "NLL" not in probe_markdown(rows)
    custom = probe_sources(params, ctx, plan, net_kwargs=NET,
                           perturbations=[("same", lambda c: c)])
    assert all(r["rel_dB_change"] == 0.0 for r in custom)
    with pytest.raises(UserError, match="'swap' perturbation needs the source adapters"):
        probe_sources(params, ctx, plan, net_kwargs=NET, perturbations=["swap"])
    with pytest.raises(UserError, match="unknown perturbation 'flip'"):
        probe_sources(params, ctx, plan, net_kwargs=NET, perturbations=["flip"])
    fresh = init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), **NET)  # ΔB = 0
    rows = probe_sources(fresh, ctx, plan, net_kwargs=NET, perturbations=["noise"])
    assert all(np.isnan(r["rel_dB_change"]) and r["dB_fro"] == 0 for r in rows)
    assert "n/a" in probe_markdown(rows)


# ----------------------------------------------------------------------------- fuse runs
@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo()  # q/v sources, q/k/v target (k_proj unfused)


def _tiny(zoo, out, **fusion):
    from hfjax.testing.zoo import tiny_fuse_config

    cfg = tiny_fuse_config(zoo, out)
    cfg.train.max_steps = 2
    for k, v in fusion.items():
        cfg.fusion[k] = v
    return cfg


def test_prepare_zero_sources_alias_equals_zero_control(zoo, tmp_path):
    from hfjax.training.fuse_loop import prepare

    a = prepare(_tiny(zoo, tmp_path / "a", zero_sources=True)).contexts
    b = prepare(_tiny(zoo, tmp_path / "b", source_control="zero")).contexts
    plain = prepare(_tiny(zoo, tmp_path / "c")).contexts
    for (_, _, x), (_, _, y), (_, _, p) in zip(_cells(a), _cells(b), _cells(plain), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
        assert not np.any(x["src"]) and np.any(p["src"])
        np.testing.assert_array_equal(x["tgt"], p["tgt"])
    with pytest.raises(UserError, match="conflicts"):
        prepare(_tiny(zoo, tmp_path / "d", zero_sources=True, source_control="noise"))


@pytest.fixture(scope="module")
def control_runs(zoo, tmp_path_factory):
    """A 2-step fuse run with each source control (one compilation: same statics)."""
    from hfjax.training.fuse_loop import run_fusion

    out = {}
    for control in ("none", "zero", "noise", "mismatch"):
        cfg = _tiny(zoo, tmp_path_factory.mktemp(control), source_control=control)
        out[control] = (cfg, run_fusion(cfg, progress=False))
    return out


def test_fuse_runs_with_each_control_and_differ(zoo, control_runs):
    from bridge import load_adapter

    out = {}
    for control, (_, res) in control_runs.items():
        assert res.steps == 2 and res.adapter_dir is not None
        assert res.report["source_control"] == control
        out[control] = load_adapter(res.adapter_dir)
    fused = control_runs["none"][1].report["alpha_times_delta_B_fro"]
    target = load_adapter(zoo["target_adapter"])
    for control in ("zero", "noise", "mismatch"):
        diff = max(float(np.abs(out[control].modules[n].B - out["none"].modules[n].B).max())
                   for n in fused)
        assert diff > 1e-6, control
        for n, m in target.modules.items():  # A and unfused modules as the target's
            np.testing.assert_array_equal(out[control].modules[n].A, m.A)
            if n not in fused:
                np.testing.assert_array_equal(out[control].modules[n].B, m.B)


def test_probe_on_trained_networks_with_test_nll(control_runs):
    """The probe on networks a fuse run trained, with the caller's NLL on replay examples."""
    from hfjax.loading import from_pretrained
    from hfjax.training.data import iterate_batches
    from hfjax.training.fuse_loop import prepare, reuse_networks, statics_from
    from hfjax.training.fuse_step import patched_adapter
    from hfjax.training.objective import lm_loss

    cfg, res = control_runs["none"]
    inp = prepare(cfg)
    st = statics_from(cfg, inp.plan, inp.model_cfg)
    params = init_fusion_params(inp.plan, inp.contexts, key=jax.random.PRNGKey(0),
                                **st.net_kwargs)
    params = reuse_networks(params, res.output_dir)
    params["alpha"] = {g: jnp.float32(a) for g, a in res.report["alpha"].items()}
    base = from_pretrained(cfg.target.model_path, dtype="float32").params
    adapter = inp.target.to_jax(jnp.float32)
    batch = next(iterate_batches(inp.replay.examples, batch_size=8, epoch=0, seed=0,
                                 buckets=(160,), pad_id=inp.tokenizer.pad_token_id or 0))
    nll_jit = jax.jit(lambda b: lm_loss(base, inp.model_cfg, batch, patched_adapter(adapter, b)))

    rows = probe_sources(params, inp.contexts, inp.plan, net_kwargs=st.net_kwargs,
                         sources=inp.sources, seed=cfg.seed,
                         target_B={n: inp.target.modules[n].B for n in inp.plan.fused_modules},
                         nll_fn=lambda b: float(nll_jit({k: jnp.asarray(v)
                                                         for k, v in b.items()})))
    print("\n" + probe_markdown(rows))
    alls = {r["perturbation"]: r for r in rows if r["group"] == "all"}
    assert set(alls) == {"zero", "noise", "swap", "roll"}
    assert all(r["dB_fro"] > 0 and np.isfinite(r["rel_dB_change"]) for r in alls.values())
    assert alls["zero"]["rel_dB_change"] > 0 and np.isfinite(alls["zero"]["nll_change"])
