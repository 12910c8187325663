"""The llama-like decoder as a pure function of (params, inputs, adapter).

::

    logits = forward(params, cfg, input_ids, attention_mask, adapter)
    # params:   {"embed": (V, D), "layers": [{"input_norm"?, "attn": {q,k,v,o_proj,
    #             q_norm?, k_norm?}, "attn_out_norm"?, "post_norm"?, "mlp": {gate,up,down_proj},
    #             "mlp_out_norm"?}, ...], "final_norm", "lm_head"?}  (? = family delta)
    # adapter:  {"model.layers.3.self_attn.q_proj": {"A": (r, D), "B": (Dq, r), "scale": ()}}
    # logits:   (B, T, V) float32

Two layouts of ``params["layers"]``, same function: a list of per-layer pytrees (an unrolled
Python loop: compile time grows with depth) or, from `stack_layers` /
``from_pretrained(stacked=True)``, ONE pytree of (N, ...) arrays run as a `jax.lax.scan`
(compile time independent of depth). Layers that differ ride along as scanned arrays: the
attention window per layer (0 = full), a local-RoPE flag selecting between two cos/sin
tables, and the adapter stacked per module kind by `stack_adapter` (missing layers and
smaller ranks zero-padded: exact). `layer_plan` says which in one line.

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

from collections.abc import Sequence
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


def _layer(x: jax.Array, p: Params, loras: dict[str, Any], cfg: ModelConfig,
           cos: jax.Array, sin: jax.Array, mask: jax.Array, kv: Cache | None,
           cache_index: jax.Array | None) -> tuple[jax.Array, Cache | None]:
    """One decoder layer. ``loras``: module kind (``"q_proj"``, ...) -> its LoRA or None;
    ``cos``/``sin``: this layer's RoPE tables; ``mask``: its (B, 1, T, S) attention mask."""
    b, t, _ = x.shape
    h = x if cfg.layer_norms == "post" else _norm(x, p["input_norm"], cfg)
    att = p["attn"]
    q = lora.linear(h, att["q_proj"], loras["q_proj"])
    k = lora.linear(h, att["k_proj"], loras["k_proj"])
    v = lora.linear(h, att["v_proj"], loras["v_proj"])
    if cfg.qk_norm == "full":
        q, k = _norm(q, att["q_norm"], cfg), _norm(k, att["k_norm"], cfg)
    q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
    if cfg.qk_norm == "head":
        q, k = _norm(q, att["q_norm"], cfg), _norm(k, att["k_norm"], cfg)
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
    o = _attention(q, k, v, mask, cfg)
    o = o.reshape(b, t, cfg.num_attention_heads * cfg.head_dim)
    o = lora.linear(o, att["o_proj"], loras["o_proj"])
    if cfg.layer_norms != "pre":
        o = _norm(o, p["attn_out_norm"], cfg)
    x = nn.with_logical_constraint(x + o, ("batch", "seq", "embed"))

    h = x if cfg.layer_norms == "post" else _norm(x, p["post_norm"], cfg)
    mlp = p["mlp"]
    g = lora.linear(h, mlp["gate_proj"], loras["gate_proj"])
    u = lora.linear(h, mlp["up_proj"], loras["up_proj"])
    a = nn.with_logical_constraint(_act(g, cfg) * u, ("batch", "seq", "mlp"))
    m = lora.linear(a, mlp["down_proj"], loras["down_proj"])
    if cfg.layer_norms != "pre":
        m = _norm(m, p["mlp_out_norm"], cfg)
    x = nn.with_logical_constraint(x + m, ("batch", "seq", "embed"))
    return x, new_kv


def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, adapter: Adapter | None = None, *,
            position_ids: jax.Array | None = None, cache: Cache | None = None,
            cache_index: jax.Array | int | None = None, return_hidden: bool = False,
            remat: bool = False, stacked_lora: dict[str, Any] | None = None
            ) -> tuple[jax.Array, Cache | None]:
    """Run the decoder. Returns ``(logits float32 (B, T, V) or hidden (B, T, D), new_cache)``.

    Without ``cache``, ``attention_mask`` (B, T) marks real tokens and positions default to
    ``arange(T)`` (as transformers' forward). With ``cache`` (from `init_cache`), the T new
    tokens are written at ``cache_index``; ``attention_mask`` then covers the new tokens and
    the cache remembers which earlier slots were real.

    ``stacked_lora`` (stacked params only) is the adapter already in the scanned layout
    (`stack_adapter`, patched with `set_stacked`); it replaces ``adapter``.
    """
    adapter = adapter or {}
    if stacked_lora is not None and not is_stacked(params):
        raise ValueError("stacked_lora needs stacked params (stack_layers)")
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

    if is_stacked(params):
        x, new_layers = _scan_layers(x, params["layers"], cfg, rotary, masks, adapter,
                                     None if cache is None else cache["layers"], start,
                                     q_idx, k_idx, k_valid, remat, stacked_lora)
    else:
        x, new_layers = _loop_layers(x, params["layers"], cfg, rotary, masks, adapter,
                                     None if cache is None else cache["layers"], start, remat)
    x = _norm(x, params["final_norm"], cfg)
    new_cache = None if cache is None else {"layers": new_layers, "valid": k_valid}
    if return_hidden:
        return x, new_cache
    head = emb.T if cfg.tie_word_embeddings else params["lm_head"]
    logits = (x @ head.astype(x.dtype)).astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return nn.with_logical_constraint(logits, ("batch", "seq", "vocab")), new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype, *,
               stacked: bool = False) -> Cache:
    """An empty KV cache: per-layer ``{"k", "v"}`` (B, S, Hkv, hd) in a list, or (with
    ``stacked``, for stacked params) one ``{"k", "v"}`` of (N, B, S, Hkv, hd)."""
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    if stacked:
        n = cfg.num_hidden_layers
        layers: Any = {"k": jnp.zeros((n, *shape), dtype), "v": jnp.zeros((n, *shape), dtype)}
    else:
        layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                  for _ in range(cfg.num_hidden_layers)]
    return {"layers": layers, "valid": jnp.zeros((batch, max_len), bool)}


# ----------------------------------------------------------------------------- layer stacks
_KINDS = {**_ATTN_HF, **_MLP_HF}  # module kind -> HF suffix under model.layers.{i}.


def is_stacked(params: Params) -> bool:
    """True when ``params["layers"]`` is one pytree of (N, ...) arrays (the scanned layout)."""
    return isinstance(params["layers"], dict)


def stack_layers(params: Params) -> Params:
    """The list-of-layers params with their layers stacked into (N, ...) arrays (a copy)."""
    if is_stacked(params):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def unstack_layers(params: Params) -> Params:
    """The inverse of `stack_layers`: ``params["layers"]`` as a list of per-layer pytrees."""
    if not is_stacked(params):
        return params
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)]}


def _layer_loras(adapter: Adapter, i: int) -> dict[str, Any]:
    pre = f"model.layers.{i}."
    return {kind: adapter.get(pre + hf) for kind, hf in _KINDS.items()}


def stack_adapter(adapter: Adapter, cfg: ModelConfig) -> dict[str, Any]:
    """Per module kind, the adapter's LoRAs stacked over layers (None if no layer has one).

    Layers the adapter leaves out get zeros, and smaller ranks are zero-padded to the
    kind's largest rank: ``B A`` is unchanged (the padded rows of A and columns of B are
    zero), so the scanned forward computes exactly the per-layer function. Shapes:
    ``{"A": (N, r, d_in), "B": (N, d_out, r), "scale": (N,)}``."""
    n = cfg.num_hidden_layers
    shapes = module_names(cfg)
    out: dict[str, Any] = {}
    for kind, hf in _KINDS.items():
        mods = [adapter.get(f"model.layers.{i}.{hf}") for i in range(n)]
        present = [m for m in mods if m is not None]
        if not present:
            out[kind] = None
            continue
        d_in, d_out = shapes[f"model.layers.0.{hf}"]
        r = max(m["A"].shape[0] for m in present)
        da = jnp.result_type(*[m["A"].dtype for m in present])
        db = jnp.result_type(*[m["B"].dtype for m in present])
        ds = jnp.result_type(*[jnp.asarray(m["scale"]).dtype for m in present])

        def pad(x: jax.Array, axis: int, r: int = r) -> jax.Array:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, r - x.shape[axis])
            return jnp.pad(x, widths) if x.shape[axis] != r else x

        out[kind] = {
            "A": jnp.stack([pad(m["A"].astype(da), 0) if m is not None
                            else jnp.zeros((r, d_in), da) for m in mods]),
            "B": jnp.stack([pad(m["B"].astype(db), 1) if m is not None
                            else jnp.zeros((d_out, r), db) for m in mods]),
            "scale": jnp.stack([jnp.asarray(m["scale"], ds) if m is not None
                                else jnp.zeros((), ds) for m in mods]),
        }
    return out


def kind_of(suffix: str) -> str:
    """The module kind (``q_proj``) of a path suffix under ``model.layers.{i}.``
    (``self_attn.q_proj``)."""
    for kind, hf in _KINDS.items():
        if hf == suffix:
            return kind
    raise KeyError(f"{suffix!r} is not a decoder module the LoRA forward patches")


def set_stacked(stacked: dict[str, Any], suffix: str, factor: str, layers: Sequence[int],
                values: jax.Array) -> dict[str, Any]:
    """``stacked`` (`stack_adapter`'s) with ``factor`` (``"A"`` or ``"B"``) of the
    ``suffix`` modules replaced at ``layers`` by ``values`` (one row per layer, zero-padded to
    the kind's rank as `stack_adapter` pads). Covering every layer in order replaces the
    array; otherwise one scatter. Pure and differentiable in ``values``."""
    kind = kind_of(suffix)
    entry = stacked[kind]
    if entry is None:
        raise KeyError(f"the adapter has no {suffix} module to replace")
    old = entry[factor]
    axis = 1 if factor == "A" else 2  # the rank axis of (N, r, d_in) / (N, d_out, r)
    v = values.astype(old.dtype)
    if v.shape[axis] != old.shape[axis]:
        widths = [(0, 0)] * v.ndim
        widths[axis] = (0, old.shape[axis] - v.shape[axis])
        v = jnp.pad(v, widths)
    layers = tuple(int(i) for i in layers)
    new = v if layers == tuple(range(old.shape[0])) else old.at[jnp.asarray(layers)].set(v)
    return {**stacked, kind: {**entry, factor: new}}


def layer_plan(cfg: ModelConfig, adapter_modules: Any = (), stacked: bool = True) -> str:
    """One line saying how `forward` runs the layers: scanned (and which per-layer values
    ride along as arrays) or an unrolled loop."""
    n = cfg.num_hidden_layers
    if not stacked:
        return f"decoder: {n} layers unrolled (list-of-layers params; compile grows with depth)"
    notes = []
    windows = set(cfg.sliding_windows)
    if len(windows) > 1:
        notes.append(f"per-layer attention windows {sorted(w or 0 for w in windows)} as an array")
    if cfg.rope_local_theta is not None and len(windows) > 1:
        notes.append("local/global RoPE tables selected by a per-layer flag")
    kinds: dict[str, set[int]] = {}
    for name in adapter_modules:
        parts = str(name).split(".")
        kinds.setdefault(parts[-1], set()).add(int(parts[2]))
    partial = sorted(k for k, ls in kinds.items() if len(ls) < n)
    if partial:
        notes.append(f"LoRA on some layers only ({', '.join(partial)}): zero-padded")
    extra = f" ({'; '.join(notes)})" if notes else " (identical layers)"
    return f"decoder: {n} layers in one lax.scan over stacked params{extra}"


def _loop_layers(x: jax.Array, layers: list[Params], cfg: ModelConfig, rotary: dict, masks: dict,
                 adapter: Adapter, kv_layers: list | None, start: jax.Array, remat: bool
                 ) -> tuple[jax.Array, list]:
    layer_fn = jax.checkpoint(_layer, static_argnums=(3,)) if remat else _layer
    new_layers = []
    for i, p in enumerate(layers):
        window = cfg.sliding_windows[i]
        cos, sin = rotary[window is not None and cfg.rope_local_theta is not None]
        kv = kv_layers[i] if kv_layers is not None else None
        x, new_kv = layer_fn(x, p, _layer_loras(adapter, i), cfg, cos, sin, masks[window or 0],
                             kv, start)
        new_layers.append(new_kv)
    return x, new_layers


def _is_bf16_kernel(path: Any, a: Any) -> bool:
    return a.dtype == jnp.bfloat16 and getattr(path[-1], "key", None) == "kernel"


def _kernels_as_bits(layers: Params) -> Params:
    """On CPU, the stacked bf16 kernels as their uint16 bits (`lora.as_bits`).

    XLA:CPU has no bf16 dot, so it up-casts a dot's operands; reaching a kernel sliced from
    the stacked array, it up-casts the whole stack once, outside the loop, and keeps that
    float32 copy of every layer from the forward to the backward. Sliced as integers, each
    layer's kernel is up-cast inside the loop body: one layer's float32 copy at a time (the
    same dots and values; docs/performance.md §7). XLA:CPU still copies the stack once to
    reinterpret it; `frozen_kernel_bits` does that once, before the step. Other backends
    have bf16 dots."""
    if jax.default_backend() != "cpu":
        return layers
    return jax.tree_util.tree_map_with_path(
        lambda path, a: lora.as_bits(a) if _is_bf16_kernel(path, a) else a, layers)


def frozen_kernel_bits(params: Params, *, consume: bool = False) -> Params:
    """A stacked bf16 base that is never differentiated (the fuse step's), on CPU: its layer
    kernels stored as uint16 bits (`lora.as_bits`), so that the scanned step neither copies
    nor up-casts the whole stack (`_kernels_as_bits`). ``consume``: delete each bf16 kernel
    as soon as its bits exist (the caller owns ``params``; at most one kernel's copy extra).
    Unchanged elsewhere and for other dtypes; `forward` reads both forms."""
    if jax.default_backend() != "cpu" or not is_stacked(params):
        return params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params["layers"])
    out = []
    for path, a in leaves:
        if _is_bf16_kernel(path, a):
            bits = jax.block_until_ready(lora.as_bits(a))
            if consume:
                a.delete()
            a = bits
        out.append(a)
    return {**params, "layers": jax.tree_util.tree_unflatten(treedef, out)}


def _scan_layers(x: jax.Array, layers: Params, cfg: ModelConfig, rotary: dict, masks: dict,
                 adapter: Adapter, kv_layers: Any, start: jax.Array, q_idx: jax.Array,
                 k_idx: jax.Array, k_valid: jax.Array, remat: bool,
                 stacked_lora: dict[str, Any] | None = None) -> tuple[jax.Array, Any]:
    """All layers as one `lax.scan`: compile time independent of depth. Per-layer values
    (window, local-RoPE flag, LoRAs) are scanned arrays; uniform ones stay closed over."""
    windows = [w or 0 for w in cfg.sliding_windows]
    local = [w is not None and cfg.rope_local_theta is not None for w in cfg.sliding_windows]
    lora = stack_adapter(adapter, cfg) if stacked_lora is None else stacked_lora
    xs: dict[str, Any] = {"p": _kernels_as_bits(layers), "lora": lora}
    if len(set(windows)) > 1:
        xs["window"] = jnp.asarray(windows, jnp.int32)
    if len(set(local)) > 1:
        xs["local"] = jnp.asarray(local)
    if isinstance(kv_layers, list):
        kv_layers = jax.tree.map(lambda *a: jnp.stack(a), *kv_layers)
    if kv_layers is not None:
        xs["kv"] = kv_layers

    def body(h: jax.Array, xl: dict[str, Any]) -> tuple[jax.Array, Any]:
        if "window" in xl:
            w = xl["window"]
            causal = (k_idx[None, :] <= q_idx[:, None])[None] & k_valid[:, None, :]
            inside = (w == 0) | (k_idx[None, :] > q_idx[:, None] - w)[None]
            mask = (causal & inside)[:, None]
        else:
            mask = masks[windows[0]]
        if "local" in xl:
            cos = jnp.where(xl["local"], rotary[True][0], rotary[False][0])
            sin = jnp.where(xl["local"], rotary[True][1], rotary[False][1])
        else:
            cos, sin = rotary[local[0]]
        return _layer(h, xl["p"], xl["lora"], cfg, cos, sin, mask, xl.get("kv"), start)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, x, xs)
