"""RDM regulariser (docs/algorithm.md §6): host rank matching == XLA sort (value and gradient),
torch parity,
key handling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.fusion import FusionError, average_rdm, rdm_loss
from hfjax.fusion.rdm import (
    _rank_match_host,
    _rank_match_rows,
    group_key,
    group_keys,
    pair_draws,
    pair_rdm,
    rdm_draws,
    rdm_from_draws,
)

KW = {"num_projections": 64}


def embeddings(seed: int = 0, shape=(3, 5, 16)) -> np.ndarray:
    z = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    z[-1, 1] = z[0, 0]  # a duplicated token: ties in every projection
    z[-1, -1] = -np.abs(z[-1, -1])  # an all-negative token: relu gives a zero row (ties at 0)
    return z


def test_rank_match_reorders_sorted_target():
    zp = np.array([[3.0, 0.0], [1.0, 0.0], [2.0, 5.0]])
    yp = np.array([[10.0, 7.0], [30.0, 8.0], [20.0, 9.0]])
    m = _rank_match_host(zp, yp)
    # column 0: ranks of zp are 2, 0, 1 -> sorted yp (10, 20, 30) placed there;
    # column 1: ties 0, 0 keep their order (stable), 5 is largest.
    np.testing.assert_array_equal(m, [[30.0, 7.0], [10.0, 8.0], [20.0, 9.0]])
    zs, ys = np.sort(zp, 0), np.sort(yp, 0)
    assert np.sum((zs - ys) ** 2) == pytest.approx(np.sum((zp - m) ** 2))


def test_packed_key_sort_is_a_stable_argsort():
    """The host path's packed (value, position) sort == numpy's stable argsort, with ties,
    signed zeros, negatives, infinities and leading batch axes."""
    rng = np.random.default_rng(3)
    zp = rng.standard_normal((2, 3, 5, 40)).astype(np.float32)
    zp[..., ::4] = 0.0
    zp[..., 1::8] = -0.0  # ties with 0.0, as in a float sort
    zp[..., 2::9] = zp[..., 3::9]
    zp[0, 0, 0, :3] = [np.inf, -np.inf, -1e-38]
    yp = rng.standard_normal(zp.shape).astype(np.float32)
    order = np.argsort(zp, axis=-1, kind="stable")
    want = np.empty_like(yp)
    np.put_along_axis(want, order, np.sort(yp, axis=-1), axis=-1)
    np.testing.assert_array_equal(_rank_match_rows(zp, yp), want)


def test_vmapped_draws_equal_one_call_each():
    z = jnp.asarray(embeddings())
    keys = jax.random.split(jax.random.key(7), 3)
    f = jax.jit(jax.vmap(lambda k: rdm_loss(z, k, sort="host", **KW)))
    want = [float(rdm_loss(z, k, sort="host", **KW)) for k in keys]
    np.testing.assert_allclose(f(keys), want, rtol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "prelu"])
def test_host_and_xla_sort_same_value_and_gradient(activation):
    z = jnp.asarray(embeddings())
    key = jax.random.key(0)

    def f(z, sort):
        return rdm_loss(z, key, activation=activation, sort=sort, **KW)

    vg = {s: jax.jit(jax.value_and_grad(f), static_argnums=1)(z, s) for s in ("host", "xla")}
    (v_h, g_h), (v_x, g_x) = vg["host"], vg["xla"]
    assert float(v_h) > 0
    np.testing.assert_allclose(v_h, v_x, rtol=1e-6)
    np.testing.assert_allclose(g_h, g_x, rtol=1e-5, atol=1e-9)
    assert np.any(np.asarray(g_h))
    # auto = host on the CPU backend; eager works too
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(f(z, "auto"), f(z, "host"))


def test_matches_torch_given_the_same_draws():
    torch = pytest.importorskip("torch")
    from hfjax.testing.torch_reference import rdm_from_draws as torch_rdm

    z = embeddings(1)
    y, P = rdm_draws(jax.random.key(1), 15, 16, mu_target=0.0, sigma_target=1.0,
                     num_projections=64)
    want = torch_rdm(torch.from_numpy(z), torch.from_numpy(np.array(y)),
                     torch.from_numpy(np.array(P))).item()
    for sort in ("host", "xla"):
        got = float(rdm_from_draws(jnp.asarray(z), y, P, sort=sort))
        assert got == pytest.approx(want, rel=1e-5)


def test_draws_follow_spec():
    y, P = rdm_draws(jax.random.key(2), 4000, 8, mu_target=0.5, sigma_target=2.0,
                     num_projections=32)
    assert y.shape == (4000, 8) and P.shape == (8, 32)
    assert float(y.min()) == 0.0 and abs(float((y == 0).mean()) - 0.4013) < 0.03  # P(N<-0.25)
    np.testing.assert_allclose(jnp.linalg.norm(P, axis=0), 1.0, rtol=1e-5)


def test_pair_draws_follow_spec_from_one_draw():
    """`pair_draws` cuts one normal draw into the two samples and two direction sets that
    `rdm_draws` would make; `pair_rdm` is the sum of the two `rdm_from_draws`."""
    key = jax.random.key(3)
    (y_t, P_t), (y_s, P_s) = pair_draws(key, 3000, 1000, 8, mu_target=0.5, sigma_target=2.0,
                                        num_projections=32)
    assert y_t.shape == (3000, 8) and y_s.shape == (1000, 8) and P_t.shape == P_s.shape == (8, 32)
    for y in (y_t, y_s):
        assert float(y.min()) == 0.0 and abs(float((y == 0).mean()) - 0.4013) < 0.04
    for P in (P_t, P_s):
        np.testing.assert_allclose(jnp.linalg.norm(P, axis=0), 1.0, rtol=1e-5)
    flat = np.asarray(jax.random.normal(key, (2 * 8 * 32 + 4000 * 8,)))
    np.testing.assert_allclose(np.maximum(flat[:8] * 2.0 + 0.5, 0), y_t[0], rtol=1e-6)
    assert abs(float(np.corrcoef(np.asarray(P_t).ravel(), np.asarray(P_s).ravel())[0, 1])) < 0.2
    zt, zs = jnp.asarray(embeddings(0, (2, 3, 16))), jnp.asarray(embeddings(1, (2, 5, 16)))
    (a, pa), (b, pb) = pair_draws(key, 6, 10, 16, **{k: v for k, v in KW.items() if k != "sort"})
    want = rdm_from_draws(zt, a, pa) + rdm_from_draws(zs, b, pb)
    np.testing.assert_allclose(pair_rdm(zt, zs, key, **KW), want, rtol=1e-6)
    ks = group_keys(key, ["q_proj_r4", "v_proj_r4"])
    for i, g in enumerate(["q_proj_r4", "v_proj_r4"]):
        np.testing.assert_array_equal(jax.random.key_data(ks[i]),
                                      jax.random.key_data(group_key(key, g)))


def test_keys_drive_randomness():
    z = jnp.asarray(embeddings())
    a = rdm_loss(z, jax.random.key(0), **KW)
    assert float(a) == float(rdm_loss(z, jax.random.key(0), **KW))
    assert float(a) != float(rdm_loss(z, jax.random.key(1), **KW))


def test_average_rdm_combines_groups_and_buckets():
    """A group of one bucket pools z over its modules into ONE L; a group of several buckets
    (modules with different token counts) is the mean over its modules of L(z_t,m) + L(z_s,m),
    as the original's module-by-module loop. (Changed from the former bucket mean, which
    differed from the original on mixed groups.)"""
    zs = [jnp.asarray(embeddings(i, (2, 3 + i % 2, 16))) for i in range(6)]
    zs[2] = jnp.asarray(embeddings(2, (3, 2, 16)))  # bucket 1 of q: 3 modules, 2 tokens
    zs[3] = jnp.asarray(embeddings(3, (3, 5, 16)))
    aux = {"q_proj_r4": [{"z_t": zs[0], "z_s": zs[1]}, {"z_t": zs[2], "z_s": zs[3]}],
           "v_proj_r4": [{"z_t": zs[4], "z_s": zs[5]}]}
    key = jax.random.key(5)

    def module(name, b, i, zt, zs_):
        k = jax.random.fold_in(jax.random.fold_in(group_key(key, name), b), i)
        return pair_rdm(zt[i], zs_[i], k, **KW)

    per_module = ([module("q_proj_r4", 0, i, zs[0], zs[1]) for i in range(2)]
                  + [module("q_proj_r4", 1, i, zs[2], zs[3]) for i in range(3)])
    q = sum(per_module) / 5  # weighted by modules, not a mean of the two bucket means
    v = pair_rdm(zs[4], zs[5], jax.random.fold_in(group_key(key, "v_proj_r4"), 0),
                 **KW)  # pooled over both modules
    got = average_rdm(aux, key, **KW)
    np.testing.assert_allclose(got, (q + v) / 2, rtol=1e-6)
    bucket_mean = (sum(per_module[:2]) / 2 + sum(per_module[2:]) / 3) / 2
    assert abs(float(q) - float(bucket_mean)) > 1e-4 * float(q)  # the two rules differ here
    # The order of the groups in the dict does not matter (jit returns sorted dicts).
    rev = {"v_proj_r4": aux["v_proj_r4"], "q_proj_r4": aux["q_proj_r4"]}
    assert float(average_rdm(rev, key, **KW)) == float(got)
    # Groups of the same shapes are vmapped together: same values as one group at a time.
    twin = {"q_proj_r4": aux["q_proj_r4"], "k_proj_r4": aux["q_proj_r4"]}
    k_only = average_rdm({"k_proj_r4": aux["q_proj_r4"]}, key, **KW)
    np.testing.assert_allclose(average_rdm(twin, key, **KW),
                               (k_only + average_rdm({"q_proj_r4": aux["q_proj_r4"]}, key,
                                                     **KW)) / 2, rtol=1e-6)


def test_bad_options_are_refused():
    z = jnp.ones((2, 8))
    with pytest.raises(FusionError, match="sort"):
        rdm_loss(z, jax.random.key(0), sort="gpu", **KW)
    with pytest.raises(FusionError, match="activation"):
        rdm_loss(z, jax.random.key(0), activation="gelu", **KW)
    with pytest.raises(FusionError):
        average_rdm({}, jax.random.key(0))
