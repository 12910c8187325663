"""The scanned decoder: stacked params give the per-layer loop's values and gradients, for
layers that differ (sliding windows, local/global RoPE, LoRAs on some layers only, mixed
ranks), and its compiled size does not grow with depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hfjax.bench_aot import count_kernels
from hfjax.loading import init_params
from hfjax.models.config import ModelConfig
from hfjax.models.decoder import (
    forward,
    is_stacked,
    layer_plan,
    stack_adapter,
    stack_layers,
    unstack_layers,
)
from hfjax.testing.models import random_lora

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Layers that differ: Gemma 3 style sliding/full attention with separate local RoPE base.
MIXED = dict(TINY, sliding_windows=(3, None, 3, None), rope_local_theta=1000.0)


def _adapter(cfg: ModelConfig) -> dict:
    """q/v on every layer at r=4, plus down_proj at r=2 on layers 1 and 3 only."""
    a = random_lora(cfg, r=4, seed=1, target_modules=("q_proj", "v_proj")).to_jax(jnp.float32)
    b = random_lora(cfg, r=2, seed=2, target_modules=("down_proj",),
                    layers=(1, 3)).to_jax(jnp.float32)
    return {**a, **b}


@pytest.mark.parametrize("kw", [TINY, MIXED], ids=["uniform", "mixed"])
@pytest.mark.parametrize("remat", [False, True])
def test_scan_matches_loop_values_and_gradients(kw, remat):
    cfg = ModelConfig(**kw)
    params = init_params(cfg, jax.random.PRNGKey(0))
    stacked = stack_layers(params)
    assert is_stacked(stacked) and not is_stacked(params)
    adapter = _adapter(cfg)
    ids = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, cfg.vocab_size)
    mask = jnp.ones((2, 9), jnp.int32).at[1, :2].set(0)

    def loss(bs, p):
        ad = {k: {**v, "B": bs[k]} for k, v in adapter.items()}
        return jnp.sum(forward(p, cfg, ids, mask, ad, remat=remat)[0] ** 2)

    bs = {k: v["B"] for k, v in adapter.items()}
    v_loop, g_loop = jax.jit(jax.value_and_grad(loss))(bs, params)
    v_scan, g_scan = jax.jit(jax.value_and_grad(loss))(bs, stacked)
    np.testing.assert_allclose(v_scan, v_loop, rtol=1e-5)
    for k in bs:
        np.testing.assert_allclose(g_scan[k], g_loop[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # The LoRA matters (the comparison is not between two base-only forwards).
    base = jnp.sum(forward(stacked, cfg, ids, mask)[0] ** 2)
    assert abs(float(base) - float(v_scan)) > 1e-3
    back = unstack_layers(stacked)
    np.testing.assert_array_equal(back["layers"][2]["attn"]["q_proj"]["kernel"],
                                  params["layers"][2]["attn"]["q_proj"]["kernel"])


def test_stack_adapter_pads_missing_layers_and_ranks_with_zeros():
    cfg = ModelConfig(**TINY)
    st = stack_adapter(_adapter(cfg), cfg)
    assert st["k_proj"] is None
    assert st["q_proj"]["A"].shape == (4, 4, 32) and st["q_proj"]["B"].shape == (4, 32, 4)
    down = st["down_proj"]
    assert down["A"].shape == (4, 2, 48)
    assert float(jnp.abs(down["B"][0]).max()) == 0.0 and float(down["scale"][2]) == 0.0
    assert float(jnp.abs(down["B"][1]).max()) > 0.0


def test_layer_plan_says_what_rides_along():
    cfg = ModelConfig(**MIXED)
    line = layer_plan(cfg, _adapter(cfg))
    assert "lax.scan" in line and "windows" in line and "RoPE" in line and "down_proj" in line
    assert "unrolled" in layer_plan(cfg, stacked=False)


def _kernels(cfg: ModelConfig, stacked: bool) -> int:
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    if stacked:
        params = jax.eval_shape(stack_layers, params)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    fn = jax.jit(lambda p, i: forward(p, cfg, i)[0])
    return count_kernels(fn.lower(params, ids).compile().as_text())


def test_compiled_size_does_not_grow_with_depth():
    shallow, deep = (ModelConfig(**dict(MIXED, num_hidden_layers=n,
                                        sliding_windows=(3, None) * (n // 2)))
                     for n in (2, 8))
    assert _kernels(shallow, True) == _kernels(deep, True)
    assert _kernels(deep, False) > _kernels(shallow, False) + 20  # the loop unrolls

