"""Parity with the original PyTorch ``HeteroFusionTransferNet`` (docs/algorithm.md §4).

Two things live here:

1. A **name table** between the original module's ``state_dict`` and our flax parameter tree,
   used in both directions (:func:`torch_state_dict_to_params`,
   :func:`params_to_torch_state_dict`). torch ``Linear.weight`` is ``(out, in)``; a flax
   kernel is ``(in, out)``: the only hook is that transpose.
2. :func:`reference_forward`, a plain line-by-line port of the original forward in jnp (two
   encoder calls, an explicit transpose for the column view, queries and decoder on *every*
   target token). It is the yardstick for the fast :class:`~hfjax.fusion.network.TransferNet`.

Example::

    fn = from_torch_state_dict(torch_net.state_dict(), block_size=16, rank=4, embed_dim=32,
                               num_heads=4, max_pos=64, mu_gate=0.1)
    delta, attn, z_t, z_s = fn(tgt_flat, tgt_s, src_flat, src_s)
    # batched in, batched out, like the torch module:
    #   tgt_flat (M, n_t, 64) -> delta (M, n_t, 64), attn (M, n_t, n_s),
    #   z_t (M, n_t, 32), z_s (M, n_s, 32)
    # unbatched inputs (n_t, 64) give unbatched outputs (n_t, 64) ...
    fn.params   # the converted flax params, ready for TransferNet.apply({"params": ...})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hfjax.fusion.plan import FusionError

Array = jax.Array

# torch module path -> (flax path, kind). kind: "linear" (weight^T -> kernel, bias),
# "norm" (weight -> scale, bias), "embed" (weight -> embedding).
TORCH_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("encoder.input_norm", ("encoder", "input_norm"), "norm"),
    ("encoder.proj_row.0", ("encoder", "proj_row"), "linear"),
    ("encoder.proj_col.0", ("encoder", "proj_col"), "linear"),
    ("encoder.gate_net.0", ("encoder", "gate_hidden"), "linear"),
    ("encoder.gate_net.2", ("encoder", "gate_out"), "linear"),
    ("encoder.fusion_norm", ("encoder", "fusion_norm"), "norm"),
    ("pos_embed", ("pos_embed",), "embed"),
    ("attention.q_proj", ("attention", "q_proj"), "linear"),
    ("attention.k_proj", ("attention", "k_proj"), "linear"),
    ("attention.v_proj", ("attention", "v_proj"), "linear"),
    ("attention.out_proj", ("attention", "out_proj"), "linear"),
    ("decoder_layer.0", ("decoder_hidden",), "linear"),
    ("decoder_layer.2", ("decoder_out",), "linear"),
)
_FIELDS = {"linear": (("weight", "kernel"), ("bias", "bias")),
           "norm": (("weight", "scale"), ("bias", "bias")),
           "embed": (("weight", "embedding"),)}


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; torch is not imported here
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, dtype=np.float32)


def _expected_shapes(block_size: int, rank: int, embed_dim: int, max_pos: int
                     ) -> dict[str, tuple[int, ...]]:
    F, E, G = block_size * rank, embed_dim, embed_dim // 4
    lin = {"encoder.proj_row.0": (E, F), "encoder.proj_col.0": (E, F),
           "encoder.gate_net.0": (G, rank), "encoder.gate_net.2": (E, G),
           "attention.q_proj": (E, E), "attention.k_proj": (E, E), "attention.v_proj": (E, E),
           "attention.out_proj": (E, E), "decoder_layer.0": (E, E), "decoder_layer.2": (F, E)}
    out = {}
    for mod, (o, i) in lin.items():
        out[f"{mod}.weight"], out[f"{mod}.bias"] = (o, i), (o,)
    for mod, d in (("encoder.input_norm", F), ("encoder.fusion_norm", E)):
        out[f"{mod}.weight"], out[f"{mod}.bias"] = (d,), (d,)
    out["pos_embed.weight"] = (max_pos, E)
    return out


def torch_state_dict_to_params(
    state_dict: Mapping[str, Any], *, block_size: int, rank: int, embed_dim: int,
    max_pos: int,
) -> dict[str, Any]:
    """The original module's ``state_dict`` -> our flax ``params`` (float32 jnp).

    Raises:
        FusionError: missing or unexpected keys, or a shape that does not fit the config.
    """
    want = _expected_shapes(block_size, rank, embed_dim, max_pos)
    missing = sorted(set(want) - set(state_dict))
    extra = sorted(set(state_dict) - set(want))
    if missing or extra:
        raise FusionError(f"state_dict does not match HeteroFusionTransferNet: missing {missing}, "
                          f"unexpected {extra}")
    params: dict[str, Any] = {}
    for tmod, fpath, kind in TORCH_TABLE:
        node = params
        for p in fpath:
            node = node.setdefault(p, {})
        for tname, fname in _FIELDS[kind]:
            key = f"{tmod}.{tname}"
            v = _to_numpy(state_dict[key])
            if v.shape != want[key]:
                raise FusionError(f"state_dict[{key!r}] has shape {v.shape}, expected {want[key]}")
            node[fname] = jnp.asarray(v.T if fname == "kernel" else v)
    return params


def params_to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our flax ``params`` -> the original module's ``state_dict`` layout (numpy float32)."""
    out = {}
    for tmod, fpath, kind in TORCH_TABLE:
        node = params
        for p in fpath:
            node = node[p]
        for tname, fname in _FIELDS[kind]:
            v = np.array(node[fname], dtype=np.float32)  # a writable copy
            out[f"{tmod}.{tname}"] = np.ascontiguousarray(v.T) if fname == "kernel" else v
    return out


def _ln(x: Array, p: Mapping[str, Array], eps: float = 1e-5) -> Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(x: Array, p: Mapping[str, Array]) -> Array:
    return x @ p["kernel"] + p["bias"]


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _encode(p: Mapping[str, Any], x: Array, s: Array, block_size: int, rank: int,
            mu_gate: float) -> Array:
    x = _ln(x, p["input_norm"])
    f_row = _gelu(_lin(x, p["proj_row"]))
    x_t = x.reshape(*x.shape[:-1], block_size, rank).swapaxes(-1, -2).reshape(x.shape)
    f_col = _gelu(_lin(x_t, p["proj_col"]))
    logits = _lin(jax.nn.relu(_lin(s, p["gate_hidden"])), p["gate_out"])
    gate = jnp.clip(jax.nn.relu(logits + mu_gate), 0.0, 1.0)
    return _ln((f_row + f_col) * gate, p["fusion_norm"])


def reference_forward(
    params: Mapping[str, Any], tgt_flat: Array, tgt_s: Array, src_flat: Array, src_s: Array,
    *, block_size: int, rank: int, num_heads: int, mu_gate: float,
) -> tuple[Array, Array, Array, Array]:
    """The original forward, batched: ``(B, n_t, bs*r)`` etc. -> outputs for every target
    token: ``delta (B, n_t, bs*r)``, ``attn (B, n_t, n_s)``, ``z_t (B, n_t, E)``,
    ``z_s (B, n_s, E)``. ``params`` may be boxed (logical axes) or plain."""
    params = nn.unbox(params)
    enc = params["encoder"]
    z_t = _encode(enc, tgt_flat, tgt_s, block_size, rank, mu_gate)
    z_s = _encode(enc, src_flat, src_s, block_size, rank, mu_gate)
    table = params["pos_embed"]["embedding"]
    q_in = z_t + table[: z_t.shape[-2]]
    kv = z_s + table[: z_s.shape[-2]]
    att = params["attention"]
    B, n_q, E = q_in.shape
    n_k = kv.shape[1]
    hd = E // num_heads
    q = _lin(q_in, att["q_proj"]).reshape(B, n_q, num_heads, hd).transpose(0, 2, 1, 3)
    k = _lin(kv, att["k_proj"]).reshape(B, n_k, num_heads, hd).transpose(0, 2, 1, 3)
    v = _lin(kv, att["v_proj"]).reshape(B, n_k, num_heads, hd).transpose(0, 2, 1, 3)
    w = jax.nn.softmax((q @ k.swapaxes(-1, -2)) * hd ** -0.5, axis=-1)  # (B, H, n_q, n_k)
    h = (w @ v).transpose(0, 2, 1, 3).reshape(B, n_q, E)
    h = _lin(h, att["out_proj"])
    delta = _lin(_gelu(_lin(h, params["decoder_hidden"])), params["decoder_out"])
    return delta, w.mean(axis=1), z_t, z_s


def from_torch_state_dict(
    state_dict: Mapping[str, Any], *, block_size: int, rank: int, embed_dim: int,
    num_heads: int, max_pos: int, mu_gate: float,
) -> Callable[[Array, Array, Array, Array], tuple[Array, Array, Array, Array]]:
    """A jitted function with the original module's call signature and outputs.

    ``fn(tgt_flat, tgt_s, src_flat, src_s) -> (delta, attn, z_t, z_s)`` for every target token
    (not only the B tokens). Inputs batched ``(B, n, ...)`` give batched outputs, as the torch
    module; unbatched ``(n, ...)`` inputs give unbatched outputs. ``fn.params`` holds the
    converted flax params (for :class:`~hfjax.fusion.network.TransferNet`).
    """
    if embed_dim % num_heads:
        raise FusionError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    params = torch_state_dict_to_params(state_dict, block_size=block_size, rank=rank,
                                        embed_dim=embed_dim, max_pos=max_pos)
    fwd = jax.jit(lambda p, *xs: reference_forward(
        p, *xs, block_size=block_size, rank=rank, num_heads=num_heads, mu_gate=float(mu_gate)))

    def fn(tgt_flat: Any, tgt_s: Any, src_flat: Any, src_s: Any
           ) -> tuple[Array, Array, Array, Array]:
        xs = [jnp.asarray(_to_numpy(x)) for x in (tgt_flat, tgt_s, src_flat, src_s)]
        unbatched = xs[0].ndim == 2
        if unbatched:
            xs = [x[None] for x in xs]
        n_t, n_s = xs[0].shape[1], xs[2].shape[1]
        if max(n_t, n_s) > max_pos:
            raise FusionError(f"{max(n_t, n_s)} tokens exceed max_pos={max_pos}")
        out = fwd(params, *xs)
        return tuple(o[0] for o in out) if unbatched else out

    fn.params = params  # type: ignore[attr-defined]
    return fn
