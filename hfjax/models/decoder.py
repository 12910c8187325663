"""The llama-like decoder as a pure function of (params, inputs, adapter).

::

    logits = forward(params, cfg, input_ids, attention_mask, adapter)
    # params:   {"embed": (V, D), "layers": [{"input_norm"?, "attn": {q,k,v,o_proj,
    #             q_norm?, k_norm?}, "attn_out_norm"?, "post_norm"?, "mlp": {gate,up,down_proj},
    #             "mlp_out_norm"?}, ...], "final_norm", "lm_head"?}  (? = family delta)
    # adapter:  {"model.layers.3.self_attn.q_proj": {"A": (r, D), "B": (Dq, r), "scale": ()}}
    # logits:   (B, T, V) float32

Nothing is module state: a LoRA is an argument, so fusion's "dynamic patching" is calling
`forward` with patched B matrices. Family deltas come from `ModelConfig` fields (biases,
per-layer sliding windows, Llama 3 RoPE; q/k norms, norm placement and flavour, embedding
scale, GeGLU, soft-capping and per-layer-type RoPE bases for Qwen3 / Gemma 2-3 / OLMo 2).
One layer, with the optional pieces in brackets::

    h = [norm](x); q, k, v = proj(h); [q/k norm]; rope; o = o_proj(attn(q, k, v))
    x = x + [norm](o);  h = [norm](x);  x = x + [norm](down(act(gate(h)) * up(h)))

Activations carry logical axis names through
`flax.linen.with_logical_constraint`, which is a no-op outside a mesh / axis-rules context.

Numerics follow transformers: RMSNorm and softmax in float32, RoPE cos/sin computed in
float32 then cast, the causal (and sliding-window) mask by token index, padding by
``attention_mask``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hfjax import lora
from hfjax.models import rope
from hfjax.models.config import ModelConfig

Params = dict[str, Any]
Adapter = dict[str, dict[str, jax.Array]]
Cache = dict[str, Any]

_ATTN_HF = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
            "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj"}
_MLP_HF = {"gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def module_names(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every LoRA-targetable module path -> (d_in, d_out)."""
    d, hq = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    hkv, m = cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"q_proj": (d, hq), "k_proj": (d, hkv), "v_proj": (d, hkv), "o_proj": (hq, d),
              "gate_proj": (d, m), "up_proj": (d, m), "down_proj": (m, d)}
    out = {}
    for i in range(cfg.num_hidden_layers):
        for name, hf in {**_ATTN_HF, **_MLP_HF}.items():
            out[f"model.layers.{i}.{hf}"] = shapes[name]
    return out


def check_adapter(adapter: Adapter, cfg: ModelConfig, *, where: str = "adapter") -> None:
    """Refuse an adapter whose modules are not this model's projections or have wrong shapes."""
    known = module_names(cfg)
    for name, p in adapter.items():
        if name not in known:
            raise ValueError(f"{where}: module {name!r} is not a projection of this "
                             f"{cfg.model_type} model ({cfg.num_hidden_layers} layers)")
        d_in, d_out = known[name]
        a, b = p["A"].shape, p["B"].shape
        if a[1] != d_in or b[0] != d_out or a[0] != b[1]:
            raise ValueError(f"{where}: module {name!r} has A{tuple(a)} B{tuple(b)}, expected "
                             f"A(r, {d_in}) B({d_out}, r)")


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, kind: str = "llama") -> jax.Array:
    """RMSNorm over the last axis; ``kind`` is `ModelConfig.norm_kind` (where the weight and
    the cast back to ``x.dtype`` meet, as each family's transformers code does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if kind == "gemma":
        return (xf * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    if kind == "f32":
        return (scale.astype(jnp.float32) * xf).astype(x.dtype)
    return scale.astype(x.dtype) * xf.astype(x.dtype)


def _norm(x: jax.Array, scale: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, scale, cfg.rms_norm_eps, cfg.norm_kind)


def _act(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return jax.nn.gelu(x, approximate=True) if cfg.mlp_act == "gelu_tanh" else jax.nn.silu(x)


def _mask(q_idx: jax.Array, k_idx: jax.Array, k_valid: jax.Array, window: int | None) -> jax.Array:
    """(B, 1, Tq, Tk) boolean: causal by index, padding, optional sliding window."""
    m = (k_idx[None, :] <= q_idx[:, None])[None] & k_valid[:, None, :]
    if window is not None:
        m = m & (k_idx[None, :] > q_idx[:, None] - window)[None]
    return m[:, None]


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
               cfg: ModelConfig) -> jax.Array:
    """Grouped-query attention. q (B,T,H,hd), k/v (B,S,Hkv,hd), mask (B,1,T,S) -> (B,T,H,hd)."""
    b, t, h, hd = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, h // hkv, hd)
    scale = (cfg.query_pre_attn_scalar or hd) ** -0.5
    scores = jnp.einsum("btgrd,bsgd->bgrts", qg, k) * scale
    scores = scores.astype(jnp.float32)
    if cfg.attn_softcap is not None:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
    big_neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(mask[:, :, None], scores, big_neg)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs, v)
    return out.reshape(b, t, h, hd)


def _layer(x: jax.Array, p: Params, i: int, cfg: ModelConfig,
           rotary: dict[bool, tuple[jax.Array, jax.Array]], masks: dict[int, jax.Array],
           adapter: Adapter, kv: Cache | None,
           cache_index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    pre = f"model.layers.{i}."
    b, t, _ = x.shape
    h = x if cfg.layer_norms == "post" else _norm(x, p["input_norm"], cfg)
    att = p["attn"]
    q = lora.linear(h, att["q_proj"], adapter.get(pre + _ATTN_HF["q_proj"]))
    k = lora.linear(h, att["k_proj"], adapter.get(pre + _ATTN_HF["k_proj"]))
    v = lora.linear(h, att["v_proj"], adapter.get(pre + _ATTN_HF["v_proj"]))
    if cfg.qk_norm == "full":
        q, k = _norm(q, att["q_norm"], cfg), _norm(k, att["k_norm"], cfg)
    q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
        q, k = _norm(q, att["q_norm"], cfg), _norm(k, att["k_norm"], cfg)
    window = cfg.sliding_windows[i]
    cos, sin = rotary[window is not None and cfg.rope_local_theta is not None]
    q = nn.with_logical_constraint(rope.apply(q, cos, sin), ("batch", "seq", "heads", None))
    k = rope.apply(k, cos, sin)
    new_kv = None
    if kv is not None:
        zero = jnp.zeros((), jnp.int32)
        ks = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype),
                                          (zero, cache_index, zero, zero))
        vs = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype),
                                          (zero, cache_index, zero, zero))
        new_kv = {"k": ks, "v": vs}
        k, v = ks, vs
    o = _attention(q, k, v, masks[window or 0], cfg)
    o = o.reshape(b, t, cfg.num_attention_heads * cfg.head_dim)
    o = lora.linear(o, att["o_proj"], adapter.get(pre + _ATTN_HF["o_proj"]))
    if cfg.layer_norms != "pre":
        o = _norm(o, p["attn_out_norm"], cfg)
    x = nn.with_logical_constraint(x + o, ("batch", "seq", "embed"))

    h = x if cfg.layer_norms == "post" else _norm(x, p["post_norm"], cfg)
    mlp = p["mlp"]
    g = lora.linear(h, mlp["gate_proj"], adapter.get(pre + _MLP_HF["gate_proj"]))
    u = lora.linear(h, mlp["up_proj"], adapter.get(pre + _MLP_HF["up_proj"]))
    a = nn.with_logical_constraint(_act(g, cfg) * u, ("batch", "seq", "mlp"))
    m = lora.linear(a, mlp["down_proj"], adapter.get(pre + _MLP_HF["down_proj"]))
    if cfg.layer_norms != "pre":
        m = _norm(m, p["mlp_out_norm"], cfg)
    x = nn.with_logical_constraint(x + m, ("batch", "seq", "embed"))
    return x, new_kv


def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, adapter: Adapter | None = None, *,
            position_ids: jax.Array | None = None, cache: Cache | None = None,
            cache_index: jax.Array | int | None = None, return_hidden: bool = False,
            remat: bool = False) -> tuple[jax.Array, Cache | None]:
    """Run the decoder. Returns ``(logits float32 (B, T, V) or hidden (B, T, D), new_cache)``.

    Without ``cache``, ``attention_mask`` (B, T) marks real tokens and positions default to
    ``arange(T)`` (as transformers' forward). With ``cache`` (from `init_cache`), the T new
    tokens are written at ``cache_index``; ``attention_mask`` then covers the new tokens and
    the cache remembers which earlier slots were real.
    """
    adapter = adapter or {}
    b, t = input_ids.shape
    emb = params["embed"]
    dtype = emb.dtype
    x = jnp.take(emb, input_ids, axis=0)
    if cfg.embed_scale:  # sqrt(D) rounded to the embedding dtype first, as transformers does
        x = x * jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(dtype)
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    valid_new = attention_mask.astype(bool)
    if cache is None:
        start = jnp.zeros((), jnp.int32)
        q_idx = jnp.arange(t)
        k_idx = q_idx
        k_valid = valid_new
    else:
        start = jnp.asarray(cache_index, jnp.int32)
        s = cache["valid"].shape[1]
        q_idx = start + jnp.arange(t)
        k_idx = jnp.arange(s)
        k_valid = jax.lax.dynamic_update_slice(cache["valid"], valid_new, (0, start))
    if position_ids is None:
        position_ids = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    # cos/sin keyed by "is a local-RoPE layer" (only Gemma 3 has two kinds).
    rotary = {False: rope.cos_sin(position_ids, cfg, dtype)}
    if cfg.rope_local_theta is not None and any(cfg.sliding_windows):
        rotary[True] = rope.cos_sin(position_ids, cfg, dtype, local=True)
    # Keyed by window (0 = full attention): one mask per distinct window, shared by layers.
    masks = {w or 0: _mask(q_idx, k_idx, k_valid, w) for w in set(cfg.sliding_windows)}

    layer_fn = _layer
    if remat:
        layer_fn = jax.checkpoint(_layer, static_argnums=(2, 3))
    new_layers = []
    for i, p in enumerate(params["layers"]):
        kv = cache["layers"][i] if cache is not None else None
        x, new_kv = layer_fn(x, p, i, cfg, rotary, masks, adapter, kv, start)
        new_layers.append(new_kv)
    x = _norm(x, params["final_norm"], cfg)
    new_cache = None if cache is None else {"layers": new_layers, "valid": k_valid}
    if return_hidden:
        return x, new_cache
    head = emb.T if cfg.tie_word_embeddings else params["lm_head"]
    logits = (x @ head.astype(x.dtype)).astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return nn.with_logical_constraint(logits, ("batch", "seq", "vocab")), new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype) -> Cache:
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return {
        "layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                   for _ in range(cfg.num_hidden_layers)],
        "valid": jnp.zeros((batch, max_len), bool),
    }
