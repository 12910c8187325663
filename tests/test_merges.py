"""Homogeneous LoRA merges: ours (JAX) equal PEFT's ``add_weighted_adapter`` / ``merge_utils``,
and the merged adapters load in ``PeftModel`` with the logits of our forward."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import merge_utils  # noqa: E402

import hfjax  # noqa: E402
from bridge import LoraAdapter, load_adapter, save_adapter  # noqa: E402
from hfjax import merges  # noqa: E402
from hfjax.errors import UserError  # noqa: E402
from hfjax.testing.hf_models import load_hf_model, make_hf_model, make_peft_adapter, torch_logits  # noqa: E402

WEIGHTS = [0.6, -0.3, 0.5]
DENSITY = {"ties": 0.5, "magnitude_prune": 0.4, "dare_linear": 0.7, "dare_ties": 0.6}
SOURCES = {  # name: make_peft_adapter keywords; a2 adapts fewer modules, a1 is rsLoRA
    "a0": dict(r=4, alpha=8, seed=1),
    "a1": dict(r=4, alpha=16, seed=2, use_rslora=True),
    "a2": dict(r=4, alpha=4, seed=3, target_modules=["q_proj", "v_proj", "down_proj"]),
    "low": dict(r=2, alpha=4, seed=4, rank_pattern={"v_proj": 3}),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("merges")
    base = make_hf_model("llama", root / "base", seed=5)
    dirs = {name: make_peft_adapter(base, root / name, **kw) for name, kw in SOURCES.items()}
    return base, dirs, {name: load_adapter(d) for name, d in dirs.items()}


@pytest.fixture(scope="module")
def peft_model(zoo):
    base, dirs, _ = zoo
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), str(dirs["a0"]), adapter_name="a0")
    for name in ("a1", "a2", "low"):
        pm.load_adapter(str(dirs[name]), adapter_name=name)
    return pm.eval()


def _lora_layers(pm):
    return [(n, m) for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)]


def _peft_merge(pm, sources, weights, combination_type, name, **kw):
    """PEFT's merged adapter as {module: (A, B, scale)}, and the DARE keep-masks it drew,
    in our `merge_adapters(masks=...)` layout."""
    drawn = []
    real = torch.bernoulli

    def record(p, *args, **kwargs):
        out = real(p, *args, **kwargs)
        drawn.append(out.numpy().copy())
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bernoulli", record)
        pm.add_weighted_adapter(sources, weights, name, combination_type=combination_type, **kw)
    merged, masks = {}, {}
    it = iter(drawn)
    for mod, layer in _lora_layers(pm):
        if name not in layer.lora_A:
            continue
        merged[mod] = (layer.lora_A[name].weight.detach().numpy(),
                       layer.lora_B[name].weight.detach().numpy(), layer.scaling[name])
        if drawn:
            n = sum(s in layer.lora_A for s in sources)
            kinds = ("delta",) if combination_type.endswith("svd") else ("A", "B")
            masks[mod] = {k: np.stack([next(it) for _ in range(n)]) for k in kinds}
    assert next(it, None) is None
    return merged, masks


def _delta(a, b, scale):
    return scale * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))


def _ours(adapters, sources, weights, combination_type, masks, **kw):
    return merges.merge_adapters([adapters[s] for s in sources], weights, combination_type,
                                 masks=masks or None, **kw)


FACTOR_CASES = ["linear", "cat", "ties", "magnitude_prune", "dare_linear", "dare_ties"]
SVD_CASES = ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]


@pytest.mark.parametrize("combination_type", FACTOR_CASES)
def test_factor_merges_equal_peft_tensors(zoo, peft_model, combination_type):
    _, _, adapters = zoo
    sources = ["a0", "a1", "a2"]
    kw = {"density": DENSITY.get(combination_type)} if combination_type in DENSITY else {}
    ref, masks = _peft_merge(peft_model, sources, WEIGHTS, combination_type,
                             f"m_{combination_type}", **kw)
    got = _ours(adapters, sources, WEIGHTS, combination_type, masks, **kw)
    assert set(got.modules) == set(ref) == set(adapters["a0"].modules)
    for mod, (a, b, scale) in ref.items():
        m = got.modules[mod]
        assert scale == m.scale == 1.0
        np.testing.assert_allclose(m.A, a, atol=1e-5, rtol=0, err_msg=mod)
        np.testing.assert_allclose(m.B, b, atol=1e-5, rtol=0, err_msg=mod)
    assert np.abs(got.modules["model.layers.0.mlp.up_proj"].B).max() > 0.1


@pytest.mark.parametrize("combination_type", SVD_CASES)
def test_svd_merges_equal_peft_deltas(zoo, peft_model, combination_type):
    _, _, adapters = zoo
    sources = ["a0", "a1", "a2"]
    kw = {"density": DENSITY[combination_type.removesuffix("_svd")]} if (
        combination_type != "svd") else {}
    ref, masks = _peft_merge(peft_model, sources, WEIGHTS, combination_type,
                             f"m_{combination_type}", svd_rank=5, **kw)
    got = _ours(adapters, sources, WEIGHTS, combination_type, masks, svd_rank=5, **kw)
    # untruncated (rank clamped to the matrix size): our merged delta itself
    full = _ours(adapters, sources, WEIGHTS, combination_type, masks, svd_rank=64, **kw)
    for mod, (a, b, scale) in ref.items():
        m = got.modules[mod]
        assert m.rank == a.shape[0] == 5 and scale == m.scale == 1.0
        want = _delta(a, b, scale)
        err = np.abs(_delta(m.A, m.B, m.scale) - want).max()
        # A rank-5 truncation moves by up to ~ sigma_1 / (sigma_5 - sigma_6) times the rounding
        # of the merged delta (Wedin); DARE's random drop makes the spectrum dense.
        s = np.linalg.svd(_delta(full.modules[mod].A, full.modules[mod].B, 1.0),
                          compute_uv=False)
        amplify = max(1.0, s[0] / (s[4] - s[5]))
        assert err <= 1e-5 * max(1.0, np.abs(want).max()) * amplify, f"{mod}: {err:.2e}"


def test_svd_and_cat_with_mixed_ranks_equal_peft(zoo, peft_model):
    """Sources of different ranks (and a rank_pattern): PEFT's svd rank is the largest."""
    _, _, adapters = zoo
    for combination_type in ("svd", "cat"):
        ref, _ = _peft_merge(peft_model, ["low", "a0"], [1.0, 0.5], combination_type,
                             f"mixed_{combination_type}")
        got = _ours(adapters, ["low", "a0"], [1.0, 0.5], combination_type, None)
        for mod, (a, b, scale) in ref.items():
            m = got.modules[mod]
            want = _delta(a, b, scale)
            np.testing.assert_allclose(_delta(m.A, m.B, m.scale), want, atol=1e-5, rtol=0)
            if combination_type == "svd":
                assert m.rank == 4
        v = got.modules["model.layers.1.self_attn.v_proj"]
        assert v.rank == (4 if combination_type == "svd" else 3 + 4)


def test_cat_is_exact_with_rslora_first(zoo, peft_model):
    """cat keeps every source's delta; the sources' rsLoRA scale is folded into A, and the
    merged adapter says scale 1 (PEFT would copy use_rslora from the first source)."""
    _, _, adapters = zoo
    sources, w = ["a1", "a0"], [0.7, 0.4]
    ref, _ = _peft_merge(peft_model, sources, w, "cat", "rs_cat")
    got = _ours(adapters, sources, w, "cat", None)
    # PEFT 0.21 keeps use_rslora: its copy scales these tensors by sqrt(8); ours by 1.
    assert got.config["use_rslora"] is False and {m.scale for m in got.modules.values()} == {1.}
    for mod, (a, b, _) in ref.items():
        m = got.modules[mod]
        np.testing.assert_allclose(m.A, a, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(m.B, b)
        srcs = [adapters[s].modules[mod] for s in sources]
        want = sum(wi * _delta(x.A, x.B, x.scale) for x, wi in zip(srcs, w, strict=True))
        np.testing.assert_allclose(_delta(m.A, m.B, m.scale), want, atol=1e-5, rtol=0)


def test_svd_clamp_delta_close_to_peft(zoo, peft_model):
    _, _, adapters = zoo
    ref, _ = _peft_merge(peft_model, ["a0", "a1"], [0.5, 0.5], "svd", "clamped", svd_clamp=0.9)
    got = _ours(adapters, ["a0", "a1"], [0.5, 0.5], "svd", None, svd_clamp=0.9)
    unclamped = _ours(adapters, ["a0", "a1"], [0.5, 0.5], "svd", None)
    mod = "model.layers.0.self_attn.q_proj"
    a, b, scale = ref[mod]
    m = got.modules[mod]
    # the quantile is sign-invariant only up to SVD's sign choice: compare the clamped entries
    hi = np.abs(np.concatenate([b.reshape(-1), a.reshape(-1)])).max()
    assert np.abs(np.concatenate([m.B.reshape(-1), m.A.reshape(-1)])).max() <= hi + 1e-6
    assert not np.allclose(m.B, unclamped.modules[mod].B)
    np.testing.assert_allclose(_delta(m.A, m.B, 1.0), _delta(a, b, scale), atol=1e-5, rtol=0)


@pytest.mark.parametrize("combination_type, sources", [
    ("linear", ("a0", "a1", "a2")), ("cat", ("a0", "a1", "a2")), ("ties_svd", ("a0", "a1", "a2")),
    ("dare_ties", ("a0", "a1", "a2")), ("linear", ("low", "low", "low")),  # rank_pattern out
])
def test_merged_adapter_loads_in_peft_with_our_logits(zoo, tmp_path, combination_type, sources):
    base, _, adapters = zoo
    kw = {"density": 0.5} if combination_type not in ("linear", "cat") else {}
    merged = merges.merge_adapters([adapters[s] for s in sources], WEIGHTS,
                                   combination_type, key=jax.random.key(0), **kw)
    out = save_adapter(merged, tmp_path / combination_type)
    assert {m.scale for m in load_adapter(out).modules.values()} == {1.0}
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), str(out)).eval()
    ids = np.random.default_rng(1).integers(3, 96, size=(2, 9))
    ref = torch_logits(pm, ids)
    model = hfjax.from_pretrained(base, dtype="float32")
    got = np.asarray(model(ids, adapter=load_adapter(out)))
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - np.asarray(model(ids))).max() > 1e-3, "the merge changes nothing"


# ------------------------------------------------------------------------------------------
# Tensor functions against peft.utils.merge_utils
# ------------------------------------------------------------------------------------------


def _stack(seed=0, n=3, shape=(6, 10)):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_tensor_functions_equal_merge_utils():
    t = _stack()
    w = np.array([0.5, -1.0, 2.0], np.float32)
    tt, tw = [torch.from_numpy(x) for x in t], torch.from_numpy(w)
    close = dict(atol=1e-6, rtol=0)
    np.testing.assert_allclose(merges.task_arithmetic(t, w),
                               merge_utils.task_arithmetic(tt, tw), **close)
    for method in ("total", "frequency"):
        np.testing.assert_array_equal(
            merges.majority_sign_mask(t, method),
            merge_utils.calculate_majority_sign_mask(torch.from_numpy(t), method))
        np.testing.assert_allclose(merges.ties(t, w, 0.3, method),
                                   merge_utils.ties(tt, tw, 0.3, method), **close)
    sign = merges.majority_sign_mask(t)
    np.testing.assert_allclose(
        merges.disjoint_merge(t, sign),
        merge_utils.disjoint_merge(torch.from_numpy(t), torch.from_numpy(np.asarray(sign))),
        **close)
    np.testing.assert_allclose(merges.magnitude_prune(t, w, 0.25),
                               merge_utils.magnitude_prune(tt, tw, 0.25), **close)
    np.testing.assert_allclose(merges.prune(t[0], 0.5, "magnitude"),
                               merge_utils.prune(tt[0], 0.5, "magnitude"), **close)
    assert int((np.asarray(merges.prune(t[0], 0.5, "magnitude")) != 0).sum()) == 30
    np.testing.assert_array_equal(merges.prune(t[0], 1.0, "random"), t[0])
    for name in ("dare_linear", "dare_ties"):
        torch.manual_seed(0)
        masks = np.stack([torch.bernoulli(torch.full_like(x, 0.6)).numpy() for x in tt])
        torch.manual_seed(0)
        ref = getattr(merge_utils, name)(tt, tw, 0.6)
        got = getattr(merges, name)(t, w, 0.6, masks=masks)
        np.testing.assert_allclose(got, ref, **close)


def test_dare_with_a_key_is_reproducible_and_unbiased():
    t = jnp.ones((2, 200, 200), jnp.float32)
    w = jnp.array([0.5, 0.5])
    a = merges.dare_linear(t, w, 0.3, key=jax.random.key(1))
    np.testing.assert_array_equal(a, merges.dare_linear(t, w, 0.3, key=jax.random.key(1)))
    assert not np.array_equal(a, merges.dare_linear(t, w, 0.3, key=jax.random.key(2)))
    assert abs(float(a.mean()) - 1.0) < 0.02  # kept entries are rescaled by 1 / density
    assert set(np.unique(np.round(np.asarray(a) * 0.3, 5))) == {0.0, 0.5, 1.0}


# ------------------------------------------------------------------------------------------
# Target-basis projection
# ------------------------------------------------------------------------------------------


def test_projection_is_the_least_squares_delta_in_the_targets_basis(zoo):
    _, _, adapters = zoo
    source, target = adapters["a1"], adapters["a0"]
    proj = merges.project_to_target(source, target)
    assert proj.config == target.config
    for mod, t in target.modules.items():
        s, p = source.modules[mod], proj.modules[mod]
        np.testing.assert_array_equal(p.A, t.A)
        assert p.scale == t.scale
        dw = _delta(s.A, s.B, s.scale)
        # normal equations: B* = argmin ||ΔW_s - scale_t B A_t||, via numpy's lstsq
        want = np.linalg.lstsq(np.asarray(t.A, np.float64).T, dw.T / t.scale, rcond=None)[0].T
        np.testing.assert_allclose(p.B, want, atol=1e-5, rtol=1e-5)
        resid = dw - _delta(p.A, p.B, p.scale)
        assert np.abs(resid @ np.asarray(t.A, np.float64).T).max() < 1e-4


def test_projection_onto_the_same_A_rescales_B_only(zoo, tmp_path):
    base, _, adapters = zoo
    source = adapters["a0"]
    new_mods = {k: dataclasses.replace(m, B=np.zeros_like(m.B), scale=m.scale * 4)
                for k, m in source.modules.items()}
    cfg = {**source.config, "lora_alpha": source.config["lora_alpha"] * 4}
    target = LoraAdapter(config=cfg, modules=new_mods)
    proj = merges.project_to_target(source, target)
    for mod, m in source.modules.items():
        np.testing.assert_allclose(proj.modules[mod].B, m.B / 4, atol=1e-5, rtol=1e-4)
    out = save_adapter(proj, tmp_path / "projected")
    ids = np.arange(3, 15)[None]
    model = hfjax.from_pretrained(base, dtype="float32")
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), str(out)).eval()
    np.testing.assert_allclose(np.asarray(model(ids, adapter=load_adapter(out))),
                               torch_logits(pm, ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(model(ids, adapter=proj)),
                               np.asarray(model(ids, adapter=source)), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------
# Refusals: one UserError line naming the adapter and the module
# ------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and isinstance(exc.value, UserError)
    return msg


def test_refuses_different_base_shapes(zoo):
    _, dirs, adapters = zoo
    a0 = adapters["a0"]
    mod = "model.layers.1.mlp.down_proj"
    bad = dict(a0.modules)
    bad[mod] = dataclasses.replace(a0.modules[mod], A=np.zeros((4, 40), np.float32))
    other = LoraAdapter(config=a0.config, modules=bad, path="other_base_lora")
    with pytest.raises(merges.MergeError) as exc:
        merges.merge_adapters([a0, other], [1, 1], "svd")
    msg = _one_line(exc)
    assert "other_base_lora" in msg and mod in msg and str(dirs["a0"]) in msg
    with pytest.raises(merges.MergeError) as exc:
        merges.project_to_target(other, a0)
    assert mod in _one_line(exc)


def test_refuses_mismatched_ranks_modules_and_arguments(zoo):
    _, _, adapters = zoo
    a0, a2, low = adapters["a0"], adapters["a2"], adapters["low"]
    with pytest.raises(merges.MergeError, match="one rank"):
        merges.merge_adapters([a0, low], [1, 1], "ties", density=0.5)
    with pytest.raises(merges.MergeError) as exc:  # the target has no up_proj A
        merges.project_to_target(a0, a2)
    assert "model.layers.0.mlp" in _one_line(exc) and str(a0.path) in str(exc.value)
    with pytest.raises(merges.MergeError, match="density"):
        merges.merge_adapters([a0, a2], [1, 1], "ties")
    with pytest.raises(merges.MergeError, match="key or masks"):
        merges.merge_adapters([a0, a2], [1, 1], "dare_linear", density=0.5)
    with pytest.raises(merges.MergeError, match="combination_type"):
        merges.merge_adapters([a0, a2], [1, 1], "average")
    with pytest.raises(merges.MergeError, match="2 weights for 1"):
        merges.merge_adapters([a0], [1, 1])
    mod = "model.layers.0.self_attn.q_proj"
    with pytest.raises(merges.MergeError) as exc:
        merges.merge_adapters([a0, a0], [1, 1], "dare_linear", density=0.5,
                              masks={mod: {"A": np.ones((3, 4, 32))}})
    assert mod in _one_line(exc) and "(2, 4, 32)" in str(exc.value)
    with pytest.raises(merges.MergeError, match="no 'A' entry for module model.layers.0.mlp"):
        merges.merge_adapters([a0, a0], [1, 1], "dare_linear", density=0.5,
                              masks={mod: {"A": np.ones((2, 4, 32))}})


def test_one_source_is_a_linear_merge(zoo):
    """As in PEFT, a single source is merged linearly whatever the combination type."""
    a0 = zoo[2]["a0"]
    for combination_type in ("ties", "svd", "dare_linear"):
        got = merges.merge_adapters([a0], [0.5], combination_type, density=0.1)
        for mod, m in a0.modules.items():
            g = got.modules[mod]
            assert g.rank == m.rank
            np.testing.assert_allclose(_delta(g.A, g.B, g.scale), 0.5 * _delta(m.A, m.B, m.scale),
                                       atol=1e-6, rtol=0)
