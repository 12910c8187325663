"""Greedy decoding with a KV cache, stopping at EOS, token for token like transformers.

Left padding is handled as transformers' `generate` does: positions are
``cumsum(attention_mask) - 1`` (0 on pads) and padded cache slots are never attended to.
Finished rows are filled with ``pad_id``; decoding stops when every row has finished.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.models.config import ModelConfig
from hfjax.models.decoder import Adapter, Params, forward, init_cache, is_stacked


@partial(jax.jit, static_argnames=("cfg", "max_len"))
def _prefill(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
             adapter: Adapter, max_len: int):
    cache = init_cache(cfg, input_ids.shape[0], max_len, params["embed"].dtype,
                       stacked=is_stacked(params))
    pos = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    logits, cache = forward(params, cfg, input_ids, attention_mask, adapter,
                            position_ids=pos, cache=cache, cache_index=0)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), pos[:, -1], cache


@partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params: Params, cfg: ModelConfig, token: jax.Array, pos: jax.Array, cache,
          index: jax.Array, adapter: Adapter):
    logits, cache = forward(params, cfg, token[:, None], jnp.ones_like(token)[:, None], adapter,
                            position_ids=pos[:, None], cache=cache, cache_index=index)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def greedy_generate(params: Params, cfg: ModelConfig, input_ids: np.ndarray,
                    attention_mask: np.ndarray | None, max_new_tokens: int,
                    adapter: Adapter | None = None, *, eos_ids: tuple[int, ...] = (),
                    pad_id: int | None = None) -> np.ndarray:
    """Prompt + generated tokens, shape (B, T + n) with n <= max_new_tokens."""
    input_ids = np.asarray(input_ids, np.int32)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones_like(input_ids)
    attention_mask = np.asarray(attention_mask, np.int32)
    if max_new_tokens <= 0:
        return input_ids
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    adapter = adapter or {}
    token, last_pos, cache = _prefill(params, cfg, input_ids, attention_mask, adapter,
                                      t + max_new_tokens)
    eos = np.asarray(eos_ids, np.int32)
    done = np.zeros(b, bool)
    out = []
    for n in range(max_new_tokens):
        tok = np.asarray(token)
        tok = np.where(done, pad_id, tok)
        out.append(tok)
        done |= np.isin(tok, eos)
        if done.all() or n == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        token, cache = _step(params, cfg, jnp.asarray(tok), last_pos, cache,
                             jnp.asarray(t + n, jnp.int32), adapter)
    return np.concatenate([input_ids, np.stack(out, axis=1)], axis=1)
