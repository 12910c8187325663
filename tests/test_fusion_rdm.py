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
    call_draws,
    rdm_calls,
    rdm_draws,
    rdm_from_draws,
    rdm_rows,
    row_draws,
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


def test_masked_rows_give_the_unpadded_value_and_gradient():
    """Rows padded (zero tokens, any draws) and marked invalid are left out exactly: value and
    gradient equal those of the real rows alone, for both sorts."""
    z = jnp.asarray(embeddings(4, (9, 16)))
    y, P = rdm_draws(jax.random.key(4), 9, 16, num_projections=64)
    zpad = jnp.concatenate([z, jnp.zeros((4, 16))])
    ypad = jnp.concatenate([y, jnp.full((4, 16), 7.0)])
    valid = jnp.arange(13) < 9
    for sort in ("host", "xla"):
        want, gw = jax.value_and_grad(lambda z, sort=sort: rdm_from_draws(z, y, P, sort=sort))(z)
        got, gg = jax.value_and_grad(
            lambda zp, sort=sort: rdm_from_draws(zp, ypad, P, sort=sort, valid=valid))(zpad)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(gg[:9], gw, rtol=1e-5, atol=1e-9)
        assert not np.any(np.asarray(gg[9:]))


def test_call_draws_follow_spec_from_one_draw():
    """`call_draws` cuts ONE normal draw of the key into every pair's rectified samples and
    unit-norm directions (the `rdm_draws` distribution), each pair its own numbers."""
    key = jax.random.key(3)
    shapes = {"q_proj_r4": [(1, 2000, 1000)], "v_proj_r4": [(2, 3, 5), (1, 3, 6)]}
    rows = rdm_rows(shapes)
    assert [(r.group, r.bucket, r.module, r.n_t, r.n_s) for r in rows] == [
        ("q_proj_r4", 0, None, 2000, 1000), ("v_proj_r4", 0, 0, 3, 5),
        ("v_proj_r4", 0, 1, 3, 5), ("v_proj_r4", 1, 0, 3, 6)]
    assert [r.weight for r in rows] == [0.5, 0.5 / 3, 0.5 / 3, 0.5 / 3]
    calls = rdm_calls(rows)
    assert calls == [(0,), (1, 2, 3)]  # the pooled pair is too large to pad the others to
    kw = {"mu_target": 0.5, "sigma_target": 2.0, "num_projections": 32}
    draws = row_draws(key, shapes, 8, **kw)
    assert set(draws) == {(r.group, r.bucket, r.module) for r in rows}
    (y_t, P_t), (y_s, P_s) = draws[("q_proj_r4", 0, None)]
    assert y_t.shape == (2000, 8) and y_s.shape == (1000, 8) and P_t.shape == P_s.shape == (8, 32)
    for y in (y_t, y_s):
        assert float(y.min()) == 0.0 and abs(float((y == 0).mean()) - 0.4013) < 0.04
    for P in (P_t, P_s):
        np.testing.assert_allclose(jnp.linalg.norm(P, axis=0), 1.0, rtol=1e-5)
    flat = np.asarray(jax.random.normal(key, (8,)))  # the sample starts the one draw
    np.testing.assert_allclose(np.maximum(flat * 2.0 + 0.5, 0), y_t[0], rtol=1e-6)
    mats = [np.asarray(d[0][1]).ravel() for d in draws.values()]
    for i in range(len(mats)):
        for j in range(i):
            assert abs(float(np.corrcoef(mats[i], mats[j])[0, 1])) < 0.2
    # call_draws is the padded form of the same numbers
    (yt, pt, ys, ps), _ = call_draws(key, rows, calls, 8, **kw)[::-1]
    assert yt.shape == (3, 3, 8) and ys.shape == (3, 6, 8) and pt.shape == (3, 8, 32)
    np.testing.assert_array_equal(ys[1, :5], draws[("v_proj_r4", 0, 1)][1][0])


def test_keys_drive_randomness():
    z = jnp.asarray(embeddings())
    a = rdm_loss(z, jax.random.key(0), **KW)
    assert float(a) == float(rdm_loss(z, jax.random.key(0), **KW))
    assert float(a) != float(rdm_loss(z, jax.random.key(1), **KW))


def test_average_rdm_combines_groups_and_buckets():
    """A group of one bucket pools z over its modules into ONE L; a group of several buckets
    (modules with different token counts) is the mean over its modules of L(z_t,m) + L(z_s,m),
    as the original's module-by-module loop; the groups' mean is avg_rdm. The pairs run padded
    in few calls; the value is that of each pair alone with its draws (`row_draws`)."""
    zs = [jnp.asarray(embeddings(i, (2, 3 + i % 2, 16))) for i in range(6)]
    zs[2] = jnp.asarray(embeddings(2, (3, 2, 16)))  # bucket 1 of q: 3 modules, 2 tokens
    zs[3] = jnp.asarray(embeddings(3, (3, 5, 16)))
    aux = {"q_proj_r4": [{"z_t": zs[0], "z_s": zs[1]}, {"z_t": zs[2], "z_s": zs[3]}],
           "v_proj_r4": [{"z_t": zs[4], "z_s": zs[5]}]}
    key = jax.random.key(5)
    shapes = {g: [(a["z_t"].shape[0], a["z_t"].shape[1], a["z_s"].shape[1]) for a in bs]
              for g, bs in aux.items()}
    # q's five module pairs run padded as one call; v's pooled pair (6 + 8 rows) alone.
    assert rdm_calls(rdm_rows(shapes)) == [(0, 1, 2, 3, 4), (5,)]
    draws = row_draws(key, shapes, 16, num_projections=64)

    def pair(zt, zs_, k):
        (yt, pt), (ys, ps) = draws[k]
        return (rdm_from_draws(zt, yt, pt, sort="host")
                + rdm_from_draws(zs_, ys, ps, sort="host"))

    per_module = ([pair(zs[0][i], zs[1][i], ("q_proj_r4", 0, i)) for i in range(2)]
                  + [pair(zs[2][i], zs[3][i], ("q_proj_r4", 1, i)) for i in range(3)])
    q = sum(per_module) / 5  # weighted by modules, not a mean of the two bucket means
    v = pair(zs[4], zs[5], ("v_proj_r4", 0, None))  # pooled over both modules
    for sort in ("host", "xla"):
        got = average_rdm(aux, key, sort=sort, **KW)
        np.testing.assert_allclose(got, (q + v) / 2, rtol=1e-5)
    got = average_rdm(aux, key, **KW)
    bucket_mean = (sum(per_module[:2]) / 2 + sum(per_module[2:]) / 3) / 2
    assert abs(float(q) - float(bucket_mean)) > 1e-4 * float(q)  # the two rules differ here
    # The order of the groups in the dict does not matter (jit returns sorted dicts).
    rev = {"v_proj_r4": aux["v_proj_r4"], "q_proj_r4": aux["q_proj_r4"]}
    assert float(average_rdm(rev, key, **KW)) == float(got)
    # Gradients: those of the per-pair sum (padding adds nothing).
    g_all = jax.grad(lambda z: average_rdm({**aux, "v_proj_r4": [{"z_t": z, "z_s": zs[5]}]},
                                           key, **KW))(zs[4])
    g_v = jax.grad(lambda z: pair(z, zs[5], ("v_proj_r4", 0, None)) / 2)(zs[4])
    np.testing.assert_allclose(g_all, g_v, rtol=1e-4, atol=1e-8)


def test_bad_options_are_refused():
    z = jnp.ones((2, 8))
    with pytest.raises(FusionError, match="sort"):
        rdm_loss(z, jax.random.key(0), sort="gpu", **KW)
    with pytest.raises(FusionError, match="activation"):
        rdm_loss(z, jax.random.key(0), activation="gelu", **KW)
    with pytest.raises(FusionError):
        average_rdm({}, jax.random.key(0))
