"""`hfjax.lora.linear`: the hand-written backward of the LoRA up-projection equals autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax import lora


def reference_linear(x, p, a, b, scale):
    """The plain formula, differentiated by JAX itself."""
    y = x @ p["kernel"]
    xa = x.astype(a.dtype) @ a.T
    return y + ((xa @ b.T) * scale).astype(y.dtype)


@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 3, 4)])
def test_custom_backward_matches_autodiff(lead):
    ks = jax.random.split(jax.random.key(0), 6)
    d_in, d_out, r = 12, 20, 4
    x = jax.random.normal(ks[0], (*lead, d_in))
    p = {"kernel": jax.random.normal(ks[1], (d_in, d_out))}
    a = jax.random.normal(ks[2], (r, d_in))
    b = jax.random.normal(ks[3], (d_out, r))
    scale = jnp.asarray(0.7, jnp.float32)
    w = jax.random.normal(ks[4], (*lead, d_out))

    def loss(f, x, a, b, scale):
        return jnp.sum(jnp.tanh(f(x, a, b, scale)) * w)

    ours = lambda x, a, b, s: lora.linear(x, p, {"A": a, "B": b, "scale": s})  # noqa: E731
    ref = lambda x, a, b, s: reference_linear(x, p, a, b, s)  # noqa: E731
    got = jax.jit(jax.value_and_grad(lambda *z: loss(ours, *z), argnums=(0, 1, 2, 3)))(
        x, a, b, scale)
    want = jax.value_and_grad(lambda *z: loss(ref, *z), argnums=(0, 1, 2, 3))(x, a, b, scale)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, h in zip(got[1], want[1], strict=True):
        assert g.shape == h.shape and g.dtype == h.dtype
        np.testing.assert_allclose(g, h, rtol=2e-5, atol=1e-5)


def test_bf16_adapter_keeps_dtypes_and_vmaps():
    ks = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(ks[0], (3, 6, 8), jnp.bfloat16)
    p = {"kernel": jax.random.normal(ks[1], (8, 10), jnp.bfloat16)}
    a = jax.random.normal(ks[2], (2, 8), jnp.bfloat16)
    bs = jax.random.normal(ks[3], (4, 10, 2), jnp.bfloat16)  # 4 candidate B's

    def loss(b):
        return jnp.sum(lora.linear(x, p, {"A": a, "B": b, "scale": 2.0}).astype(jnp.float32))

    g = jax.vmap(jax.grad(loss))(bs)
    assert g.dtype == jnp.bfloat16 and g.shape == bs.shape
    want = jax.vmap(jax.grad(lambda b: jnp.sum(
        reference_linear(x, p, a, b, 2.0).astype(jnp.float32))))(bs)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)
