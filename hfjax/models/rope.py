"""Rotary position embeddings in HF's rotate-half layout (no q/k permutation needed).

``inv_freq`` follows transformers' `_compute_default_rope_parameters` and, for Llama 3,
`_compute_llama3_parameters` (low frequencies divided by ``factor``, a smooth ramp between) and
`_compute_linear_scaling_rope_parameters` (all divided by ``factor``). ``local=True`` gives the
sliding-window layers' frequencies where the family has its own local base (Gemma 3: plain
RoPE with ``rope_local_theta``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models.config import ModelConfig


def inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    dim = cfg.head_dim
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta is not None else cfg.rope_theta
    freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    freq = freq.astype(np.float32)
    if local and cfg.rope_local_theta is not None:
        return freq
    if cfg.rope_linear_factor != 1.0:
        freq = (freq / np.float32(cfg.rope_linear_factor)).astype(np.float32)
    if cfg.rope_llama3 is None:
        return freq
    p = dict(cfg.rope_llama3)
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > low_wl, freq / factor, freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def cos_sin(positions: jax.Array, cfg: ModelConfig, dtype: jnp.dtype,
            local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (B, T, head_dim) for integer ``positions`` (B, T), computed in float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg, local))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (B, T, heads, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
