"""Same-shaped groups run as one vmapped network call: values and gradients are unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.fusion import average_rdm, build_contexts, build_plan, init_fusion_params
from hfjax.fusion.network import group_clusters, predict_delta_B
from hfjax.testing.adapters import random_adapter

NET = dict(embed_dim=16, num_heads=4, max_pos=32, mu_gate=0.1, gate="svd")
QKV = ("q_proj", "k_proj", "v_proj")


def _setup():
    target = random_adapter(3, 24, 40, 4, modules=QKV, kv_dim=12, seed=0)
    qwen = random_adapter(2, 16, 32, 4, modules=QKV, kv_dim=8, seed=1)
    mistral = random_adapter(4, 20, 36, 4, modules=("q_proj",), seed=2)
    plan = build_plan(target, [qwen, mistral], block_size=8)
    ctx = build_contexts(plan, target, [qwen, mistral])
    params = init_fusion_params(plan, ctx, key=jax.random.PRNGKey(0), alpha_init=0.3, **NET)
    # Perturb the zero-initialised last layer so ΔB is not trivially zero.
    params = jax.tree.map(lambda x: x + 0.01 * jnp.ones_like(x), params)
    return plan, ctx, params


def test_clusters_cover_groups_once():
    plan, _, _ = _setup()
    clusters = group_clusters(plan)
    names = [g.name for c in clusters for g in c]
    assert sorted(names) == sorted(g.name for g in plan.groups)
    assert len(clusters) < len(plan.groups)  # k and v share shapes; q (two buckets) differs


def test_stacked_equals_per_group_values_and_gradients():
    plan, ctx, params = _setup()

    def loss(p, stack):
        d, aux = predict_delta_B(p, ctx, plan, stack_groups=stack, **NET)
        rdm = average_rdm(aux, jax.random.PRNGKey(3), num_projections=8)
        return sum(jnp.sum(v ** 2) for v in d.values()) + rdm, (d, rdm)

    vg = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (l1, (d1, r1)), g1 = vg(params, True)
    (l0, (d0, r0)), g0 = vg(params, False)
    np.testing.assert_allclose(float(r1), float(r0), rtol=1e-6)
    for k in d0:
        np.testing.assert_allclose(np.asarray(d1[k]), np.asarray(d0[k]), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
