"""The transfer network (docs/algorithm.md §4) and the fused update (docs/algorithm.md §5).

One :class:`TransferNet` per group reads a bucket of modules' block contexts and predicts a
correction ``ΔB`` for each target ``B``. Worked example (``block_size = 16``, ``r = 4``,
``E = 32``, 3 modules with ``d_in = 20``, ``d_out = 24`` and sources worth 5 tokens)::

    tgt   (3, 4, 64)    # n_t = n_a + n_b = 2 + 2 tokens of 16*4 values per module
    tgt_s (3, 4, 4)     # singular values per token
    src   (3, 5, 64), src_s (3, 5, 4)
    delta, attn, z_t, z_s = net.apply({"params": p}, tgt, tgt_s, src, src_s, n_a=2)
    delta (3, 2, 64)    # only the n_b = 2 B tokens (trick 4 below)
    attn  (3, 2, 5)     # head-averaged: which source token each B block listened to
    z_t   (3, 4, 32), z_s (3, 5, 32)   # encoder outputs, for the RDM regulariser
    ΔB = delta[m].reshape(-1, 4)[:24]  # (d_out, r) per module

The math is the original ``HeteroFusionTransferNet`` (``torch_compat.reference_forward`` is
a line-by-line port of it); this module computes the same numbers faster with three exact
rewrites (docs/performance.md tricks 2-4):

- **One encoder call** on target and source tokens concatenated (they share weights and
  every encoder op is per token).
- **One GEMM for both views** (``col_view="kernel"``). The column view of a token is a fixed
  permutation ``P`` of its row-major values, so ``x_T @ W_col = x @ (P W_col)``: the kernels
  ``[W_row, P W_col]`` are concatenated (inside ``__call__``; the parameters stay the
  original ``proj_row`` / ``proj_col``) and multiplied once. The alternative
  ``col_view="input"`` transposes the tokens (small) instead of the kernel (big) and runs
  two GEMMs; ``"auto"`` picks per backend (``COL_VIEW_AUTO``: "input" on CPU, see
  docs/performance.md §4.1).
- **Only B tokens query.** Target tokens never attend to each other, and the decoder
  outputs of the ``A^T`` tokens are discarded, so queries and decoder run on ``[n_a:]``
  only; their positions stay ``n_a .. n_t - 1``. The later release's ``update_mode``
  (docs/algorithm.md §11, a static choice) decodes the ``A^T`` tokens ``[0:n_a]`` instead
  (``a_only``) or every target token (``ab_joint``); ``b_only`` does exactly the work above.

Parameter tree of one network (flax names; torch names in ``torch_compat``)::

    encoder/{input_norm, proj_row, proj_col, gate_hidden, gate_out, fusion_norm}
    pos_embed/embedding
    attention/{q_proj, k_proj, v_proj, out_proj}
    decoder_hidden, decoder_out          # decoder_out starts at zero: ΔB = 0 at step 0

Logical axis names (for a sharding layer; no mesh is needed): ``block`` (the
``block_size * r`` token width: the big dimension), ``embed`` (E), ``qkv`` (attention
projections), ``mlp`` (decoder hidden), ``gate_mlp`` (E // 4), ``lora_r`` (the rank: never
shard it), ``pos`` (positions). ``init_fusion_params(..., boxed=True)`` keeps the
``nn.LogicallyPartitioned`` boxes so that ``nn.get_partition_spec`` can read them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hfjax.config.components import TransferNetConfig
from hfjax.fusion.plan import MERGE_PAD_LIMIT, FusionError, FusionPlan, Group, greedy_merge

Array = jax.Array
Params = Mapping[str, Any]

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones
LN_EPS = 1e-5
COL_VIEWS = ("auto", "kernel", "input")
# col_view="auto" per backend: on CPU the concatenated kernel's per-step copies cost more
# than one wider GEMM saves (docs/performance.md §4.1); elsewhere one GEMM is better.
COL_VIEW_AUTO = {"cpu": "input"}


def _resolve_col_view(col_view: str) -> str:
    if col_view not in COL_VIEWS:
        raise FusionError(f"col_view must be one of {COL_VIEWS}, got {col_view!r}")
    if col_view == "auto":
        return COL_VIEW_AUTO.get(jax.default_backend(), "kernel")
    return col_view


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)  # torch nn.GELU() default: exact erf


def _dense(features: int, axes: tuple[str, str], name: str, *, dtype: Any, param_dtype: Any,
           zero: bool = False) -> nn.Dense:
    """``Dense`` with torch's init here: xavier-uniform kernel (or zeros) and zero bias."""
    return nn.Dense(
        features, name=name, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_zeros if zero else _xavier, axes),
        bias_init=nn.with_logical_partitioning(_zeros, (axes[1],)),
    )


def _layer_norm(name: str, axis: str, *, dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    """torch ``nn.LayerNorm`` semantics: eps 1e-5, two-pass variance, scale 1, bias 0."""
    return nn.LayerNorm(
        epsilon=LN_EPS, use_fast_variance=False, name=name, dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(_ones, (axis,)),
        bias_init=nn.with_logical_partitioning(_zeros, (axis,)),
    )


class _Kernel(nn.Module):
    """A ``Dense`` layer's parameters only (``kernel (in, out)``, ``bias (out,)``), returned
    instead of applied, so that two kernels can be fused into one GEMM."""

    in_features: int
    features: int
    axes: tuple[str, str]
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        kernel = self.param("kernel", nn.with_logical_partitioning(_xavier, self.axes),
                            (self.in_features, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(_zeros, (self.axes[1],)),
                          (self.features,), self.param_dtype)
        return kernel, bias


class _Encoder(nn.Module):
    """``ConflictAwareBlockEncoder`` (docs/algorithm.md §4): ``(..., bs*r)`` + ``(..., r)`` ->
    ``(..., E)``."""

    block_size: int
    rank: int
    embed_dim: int
    mu_gate: float
    gate: str
    col_view: str
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array, s: Array) -> Array:
        bs, r, E = self.block_size, self.rank, self.embed_dim
        F = bs * r
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = _layer_norm("input_norm", "block", **kw)(x)
        k_row, b_row = _Kernel(F, E, ("block", "embed"), self.param_dtype, name="proj_row")()
        k_col, b_col = _Kernel(F, E, ("block", "embed"), self.param_dtype, name="proj_col")()
        x = x.astype(self.dtype)
        if _resolve_col_view(self.col_view) == "kernel":
            # Column view: token value (i, c) (row i < bs, column c < r) sits at i*r + c in x
            # and at c*bs + i in x_T, so x_T @ W_col = x @ W' with W'[i*r + c] = W_col[c*bs + i].
            k_col = k_col.reshape(r, bs, E).transpose(1, 0, 2).reshape(F, E)
            kernel = jnp.concatenate([k_row, k_col], axis=1).astype(self.dtype)
            bias = jnp.concatenate([b_row, b_col]).astype(self.dtype)
            h = _gelu(jnp.dot(x, kernel) + bias)  # (..., 2E): one GEMM
            feat = h[..., :E] + h[..., E:]
        else:  # transpose the (small) tokens instead of the (big) kernel; two GEMMs
            x_t = x.reshape(*x.shape[:-1], bs, r).swapaxes(-1, -2).reshape(x.shape)
            feat = (_gelu(jnp.dot(x, k_row.astype(self.dtype)) + b_row.astype(self.dtype))
                    + _gelu(jnp.dot(x_t, k_col.astype(self.dtype)) + b_col.astype(self.dtype)))
        if self.gate == "svd":
            g = _dense(E // 4, ("lora_r", "gate_mlp"), "gate_hidden", **kw)(s.astype(self.dtype))
            g = _dense(E, ("gate_mlp", "embed"), "gate_out", **kw)(nn.relu(g))
            feat = feat * jnp.clip(nn.relu(g + self.mu_gate), 0.0, 1.0)
        return _layer_norm("fusion_norm", "embed", **kw)(feat)


class _Attention(nn.Module):
    """Multi-head cross-attention: no mask, no dropout, scale ``head_dim ** -0.5``."""

    embed_dim: int
    num_heads: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, q_in: Array, kv: Array, kv_valid: Array | None = None
                 ) -> tuple[Array, Array]:
        """``kv_valid (..., n_kv)`` (optional) marks real keys: padded ones get weight 0."""
        E, H = self.embed_dim, self.num_heads
        hd = E // H
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q = _dense(E, ("embed", "qkv"), "q_proj", **kw)(q_in)
        k = _dense(E, ("embed", "qkv"), "k_proj", **kw)(kv)
        v = _dense(E, ("embed", "qkv"), "v_proj", **kw)(kv)
        q = q.reshape(*q.shape[:-1], H, hd)
        k = k.reshape(*k.shape[:-1], H, hd)
        v = v.reshape(*v.shape[:-1], H, hd)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) * (hd ** -0.5)
        scores = scores.astype(jnp.float32)
        if kv_valid is not None:  # exp(min - max) is exactly 0: the real keys' softmax
            scores = jnp.where(kv_valid[..., None, None, :], scores,
                               jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", w.astype(self.dtype), v)
        out = out.reshape(*out.shape[:-2], E)
        out = _dense(E, ("qkv", "embed"), "out_proj", **kw)(out)
        return out, w.mean(axis=-3)


class TransferNet(nn.Module):
    """``HeteroFusionTransferNet`` for one group, batched over a bucket's modules (fast path).

    Attributes:
        block_size, rank: token geometry; a token has ``block_size * rank`` values.
        embed_dim: E. num_heads: attention heads (E must divide by it).
        max_pos: rows of the learned position table (positions restart at 0 for target and
            for source tokens, so each side's token count must be <= max_pos).
        mu_gate: the fixed gate offset. gate: ``"svd"`` (the method) or ``"open"`` (gate fixed
            to 1: the paper's "w/o denoising" ablation; no gate parameters).
        dtype: compute dtype (float32 by default; bf16 is an opt-in speed/numerics trade).
        param_dtype: parameter dtype.
        col_view: how the column view is computed (same math): ``"kernel"`` (one GEMM on the
            concatenated ``[W_row, P W_col]`` kernel), ``"input"`` (transpose the tokens, two
            GEMMs), ``"auto"`` (see ``COL_VIEW_AUTO``).
    """

    block_size: int
    rank: int
    embed_dim: int = 1024
    num_heads: int = 8
    max_pos: int = 4096
    mu_gate: float = 0.1
    gate: str = "svd"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    col_view: str = "auto"

    @nn.compact
    def __call__(self, tgt: Array, tgt_s: Array, src: Array, src_s: Array, *,
                 n_a: int, update_mode: str = "b_only", n_src: Array | None = None,
                 q_pos: Array | None = None) -> tuple[Array, Array, Array, Array]:
        """Predict the deltas of the target tokens that ``update_mode`` patches.

        Args:
            tgt: ``(M, n_t, bs*r)`` target tokens (``n_a`` of ``A^T``, then ``n_b`` of B).
            tgt_s: ``(M, n_t, r)`` their singular values.
            src, src_s: ``(M, n_s, bs*r)``, ``(M, n_s, r)`` source tokens.
            n_a: (static) number of ``A^T`` tokens at the front of ``tgt``.
            update_mode: (static) which target tokens query and get decoded: ``"b_only"``
                the B tokens ``[n_a, n_t)``, ``"a_only"`` the ``A^T`` tokens ``[0, n_a)``,
                ``"ab_joint"`` all ``n_t`` (docs/algorithm.md §11). Each token's output is the same
                in every mode (queries are independent); only the work differs.
            n_src: ``(M,)`` real source tokens per module (optional): the rest of ``src`` is
                padding, which no query attends to (several buckets run as one call).
            q_pos: ``(M, n_q)`` the queries' positions (optional; default ``lo .. hi-1``):
                rows padded to a call's ``n_a`` keep their own positions (`padded_call`).

        Returns:
            ``delta (M, n_q, bs*r)``, ``attn (M, n_q, n_s)``, ``z_t (M, n_t, E)``,
            ``z_s (M, n_s, E)``, with ``n_q = n_b`` (b_only), ``n_a`` (a_only) or ``n_t``
            (ab_joint) decoded tokens, in token order.
        """
        _check_config(self.block_size, self.rank, self.embed_dim, self.num_heads, self.gate)
        F, E = self.block_size * self.rank, self.embed_dim
        if tgt.ndim != 3 or src.ndim != 3 or tgt.shape[-1] != F or src.shape[-1] != F:
            raise FusionError(f"TransferNet expects (M, n, {F}) tokens, got target {tgt.shape} "
                              f"and source {src.shape}")
        n_t, n_s = tgt.shape[1], src.shape[1]
        if not 0 <= n_a < n_t:
            raise FusionError(f"n_a={n_a} must leave at least one B token of {n_t}")
        if max(n_t, n_s) > self.max_pos:
            raise FusionError(f"{max(n_t, n_s)} tokens exceed max_pos={self.max_pos}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}

        # Trick 2: one encoder call on target and source tokens together.
        encoder = _Encoder(self.block_size, self.rank, E, self.mu_gate, self.gate,
                           self.col_view, name="encoder", **kw)
        z = encoder(jnp.concatenate([tgt, src], axis=1), jnp.concatenate([tgt_s, src_s], axis=1))
        z_t, z_s = z[:, :n_t], z[:, n_t:]

        pos_embed = nn.Embed(
            self.max_pos, E, name="pos_embed", **kw,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                        ("pos", "embed")))
        # Trick 4: only the tokens whose factor is patched query and get decoded (b_only: the
        # B tokens, positions n_a .. n_t-1).
        lo, hi = query_range(update_mode, n_a, n_t)
        q_in = z_t[:, lo:hi] + pos_embed(jnp.arange(lo, hi) if q_pos is None else q_pos)
        kv = z_s + pos_embed(jnp.arange(n_s))
        valid = None if n_src is None else jnp.arange(n_s) < n_src[:, None]
        h, attn = _Attention(E, self.num_heads, name="attention", **kw)(q_in, kv, valid)
        h = _gelu(_dense(E, ("embed", "mlp"), "decoder_hidden", **kw)(h))
        delta = _dense(F, ("mlp", "block"), "decoder_out", zero=True, **kw)(h)
        return delta, attn, z_t, z_s


def query_range(update_mode: str, n_a: int, n_t: int) -> tuple[int, int]:
    """The target tokens ``[lo, hi)`` that ``update_mode`` decodes (``A^T`` first, then B)."""
    if update_mode == "b_only":
        return n_a, n_t
    if update_mode == "a_only":
        return 0, n_a
    if update_mode == "ab_joint":
        return 0, n_t
    raise FusionError(f"update_mode must be one of b_only, a_only, ab_joint, got {update_mode!r}")


def _check_config(block_size: int, rank: int, embed_dim: int, num_heads: int, gate: str) -> None:
    # The shape and gate rules are TransferNetConfig's (the one copy); the first one broken.
    problems = TransferNetConfig(embed_dim=embed_dim, num_heads=num_heads, gate=gate).check(at="")
    if problems:
        raise FusionError(problems[0])
    if block_size < 1 or rank < 1:
        raise FusionError(f"block_size {block_size} and rank {rank} must be positive")


def _net(plan: FusionPlan, rank: int, *, embed_dim: int, num_heads: int, max_pos: int,
         mu_gate: float, gate: str, dtype: Any = jnp.float32, col_view: str = "auto"
         ) -> TransferNet:
    return TransferNet(block_size=plan.block_size, rank=rank, embed_dim=embed_dim,
                       num_heads=num_heads, max_pos=max_pos, mu_gate=float(mu_gate), gate=gate,
                       dtype=dtype, col_view=col_view)


def _check_contexts(plan: FusionPlan, contexts: Mapping[str, Any], max_pos: int) -> None:
    for g in plan.groups:
        if g.name not in contexts or len(contexts[g.name]) != len(g.buckets):
            raise FusionError(f"contexts do not match the plan for group {g.name}")
        for b, ctx in zip(g.buckets, contexts[g.name], strict=True):
            F = plan.block_size * g.rank
            want = {"tgt": (len(b.modules), b.n_t, F), "tgt_s": (len(b.modules), b.n_t, g.rank),
                    "src": (len(b.modules), b.n_s, F), "src_s": (len(b.modules), b.n_s, g.rank)}
            for k, shape in want.items():
                if tuple(np.shape(ctx[k])) != shape:
                    raise FusionError(f"group {g.name}: context {k} has shape "
                                      f"{tuple(np.shape(ctx[k]))}, the plan says {shape}")
            if max(b.n_t, b.n_s) > max_pos:
                raise FusionError(
                    f"group {g.name}: {max(b.n_t, b.n_s)} tokens per module exceed "
                    f"max_pos={max_pos}; raise max_pos or block_size")


@functools.cache
def _jitted_init(block_size: int, rank: int, embed_dim: int, num_heads: int, max_pos: int,
                 mu_gate: float, gate: str) -> Any:
    """``key -> boxed params`` of one network, jitted once per configuration."""
    _check_config(block_size, rank, embed_dim, num_heads, gate)
    net = TransferNet(block_size=block_size, rank=rank, embed_dim=embed_dim,
                      num_heads=num_heads, max_pos=max_pos, mu_gate=mu_gate, gate=gate)
    F = block_size * rank
    # numpy, not jnp: this function is cached, and jnp arrays made inside a trace would be
    # cached tracers.
    dummy = (np.zeros((1, 2, F), np.float32), np.zeros((1, 2, rank), np.float32),
             np.zeros((1, 1, F), np.float32), np.zeros((1, 1, rank), np.float32))
    return jax.jit(lambda key: net.init(key, *dummy, n_a=1)["params"])


def init_fusion_params(
    plan: FusionPlan,
    contexts: Mapping[str, Any] | None,
    *,
    key: Array,
    embed_dim: int = 1024,
    num_heads: int = 8,
    max_pos: int = 4096,
    mu_gate: float = 0.1,
    gate: str = "svd",
    alpha_init: float = 0.3,
    boxed: bool = False,
) -> dict[str, dict[str, Any]]:
    """Fresh trainable state: ``{"nets": {group: params}, "alpha": {group: f32 scalar}}``.

    Each network gets ``jax.random.split(key, n_groups)[i]`` (plan order). ``params`` is the
    flax ``"params"`` collection (apply with ``net.apply({"params": p}, ...)``). ``contexts``
    (optional) is checked against the plan and ``max_pos``. With ``boxed=True`` the leaves are
    ``nn.LogicallyPartitioned`` (read specs with ``nn.get_partition_spec``).
    """
    if contexts is not None:
        _check_contexts(plan, contexts, max_pos)
    keys = jax.random.split(key, len(plan.groups))
    nets = {}
    for g, k in zip(plan.groups, keys, strict=True):
        init = _jitted_init(plan.block_size, g.rank, embed_dim, num_heads, max_pos,
                            float(mu_gate), gate)
        p = init(k)
        nets[g.name] = p if boxed else nn.unbox(p)
    alpha = {g.name: jnp.asarray(alpha_init, dtype=jnp.float32) for g in plan.groups}
    return {"nets": nets, "alpha": alpha}


def predict_group_deltas(
    params: Mapping[str, Any],
    contexts: Mapping[str, Any],
    plan: FusionPlan,
    *,
    embed_dim: int = 1024,
    num_heads: int = 8,
    max_pos: int = 4096,
    mu_gate: float = 0.1,
    gate: str = "svd",
    dtype: Any = jnp.float32,
    col_view: str = "auto",
    stack_groups: bool = True,
) -> tuple[dict[str, Array], dict[str, Array], dict[str, list[dict[str, Array]]]]:
    """`predict_deltas` with each group's deltas stacked: ``{group: (M_g, r, d_in)}`` (ΔA) and
    ``{group: (M_g, d_out, r)}`` (ΔB), module ``i`` being ``g.modules[i]`` (ascending layer);
    a group whose modules differ in shape (only a hand-made plan) gets a tuple of per-module
    arrays instead.
    ``params["nets"]`` may instead be ``params["clusters"]`` (`pack_nets`: what the training
    step keeps).

    Every bucket is un-blocked by one reshape and slice for all its modules (the modules of a
    group share ``d_in`` and ``d_out``), so the number of operations does not grow with the
    number of modules; the training step works on these arrays (docs/performance.md §6).
    """
    mode = plan.update_mode
    delta_A: dict[str, Array] = {}
    delta_B: dict[str, Array] = {}
    aux: dict[str, list[dict[str, Array]]] = {}
    if "clusters" in params and not stack_groups:
        raise FusionError("cluster-packed parameters need stack_groups=True (see pack_nets)")
    for cluster in group_clusters(plan) if stack_groups else [[g] for g in plan.groups]:
        g0 = cluster[0]
        net = _net(plan, g0.rank, embed_dim=embed_dim, num_heads=num_heads, max_pos=max_pos,
                   mu_gate=mu_gate, gate=gate, dtype=dtype, col_view=col_view)
        for g in cluster:
            aux[g.name] = []
        if len(cluster) == 1:
            p = (params["clusters"][cluster_key(cluster)] if "clusters" in params
                 else params["nets"][g0.name])
        else:
            p = (params["clusters"][cluster_key(cluster)] if "clusters" in params
                 else _stack_trees([params["nets"][g.name] for g in cluster]))
        per_group: list[list[Any]] = [[None] * len(g.buckets) for g in cluster]
        for parts in zip(*(merged_calls(g) for g in cluster), strict=True):
            buckets = [[g.buckets[bi] for bi in call] for g, call in zip(cluster, parts,
                                                                       strict=True)]
            shape = _call_shape(buckets)
            plain = all(_exact(bs, shape) for bs in buckets)
            ins = [padded_call([contexts[g.name][bi] for bi in call], bs, shape, mode, max_pos,
                               plain=plain)
                   for g, call, bs in zip(cluster, parts, buckets, strict=True)]

            def apply(p: Any, c: Any, n_a: int = shape[1], net: TransferNet = net) -> Any:
                return net.apply({"params": p}, c["tgt"], c["tgt_s"], c["src"], c["src_s"],
                                 n_a=n_a, update_mode=mode, n_src=c.get("n_src"),
                                 q_pos=c.get("q_pos"))

            if len(cluster) == 1:
                outs = [apply(p, ins[0])]
            else:  # the same (padded) shapes in every group of the cluster: one vmapped call
                stacked = jax.vmap(apply)(p, _stack_trees(ins))
                outs = [tuple(o[gi] for o in stacked) for gi in range(len(cluster))]
            for gi, out in enumerate(outs):
                for bi, part in zip(parts[gi], unpadded_outputs(out, buckets[gi], shape, mode),
                                    strict=True):
                    per_group[gi][bi] = part
        for g, outs in zip(cluster, per_group, strict=True):
            dims = _group_dims(g)
            parts_A, parts_B = [], []
            for b, (delta, attn, z_t, z_s) in zip(g.buckets, outs, strict=True):
                lo, _ = query_range(mode, b.n_a, b.n_t)
                d = delta.astype(jnp.float32)  # (M_b, decoded tokens lo .. hi-1, F)
                m_b = d.shape[0]
                if dims is None:  # modules of several shapes: un-blocked one by one
                    if plan.patches_A:
                        parts_A.append([d[i, : b.n_a - lo].reshape(-1, g.rank)[: m.d_in].T
                                        for i, m in enumerate(b.modules)])
                    if plan.patches_B:
                        parts_B.append([d[i, b.n_a - lo:].reshape(-1, g.rank)[: m.d_out]
                                        for i, m in enumerate(b.modules)])
                else:
                    d_in, d_out = dims
                    if plan.patches_A:  # lo = 0 whenever A is decoded
                        parts_A.append(jnp.swapaxes(
                            d[:, : b.n_a - lo].reshape(m_b, -1, g.rank)[:, :d_in], 1, 2))
                    if plan.patches_B:
                        parts_B.append(d[:, b.n_a - lo:].reshape(m_b, -1, g.rank)[:, :d_out])
                aux[g.name].append({"z_t": z_t, "z_s": z_s, "attn": attn})
            order = _module_order(g)
            if parts_A:
                delta_A[g.name] = _in_order(parts_A, order)
            if parts_B:
                delta_B[g.name] = _in_order(parts_B, order)
    return delta_A, delta_B, aux


def _tokens(buckets: list[Any]) -> tuple[int, int]:
    """(real, padded) token rows of buckets run as one call (target and source tokens)."""
    real = sum(len(b.modules) * (b.n_t + b.n_s) for b in buckets)
    M = sum(len(b.modules) for b in buckets)
    padded = M * (max(b.n_a for b in buckets) + max(b.n_b for b in buckets)
                  + max(b.n_s for b in buckets))
    return real, padded


def merged_calls(g: Group) -> list[tuple[int, ...]]:
    """How a group's buckets run: tuples of bucket indices, each one network call.

    Buckets run as ONE call, each one's ``A^T``, B and source tokens zero-padded to the call's
    largest counts (`padded_call`: padded source tokens are masked out of the attention, padded
    target tokens decode nothing, and every output is sliced back to its bucket: exact), as long
    as the padding adds at most ``MERGE_PAD_LIMIT`` times the real tokens. Fewer, larger calls
    compile faster (docs/performance.md §6)."""
    def fits(call: list[int]) -> bool:
        real, padded = _tokens([g.buckets[j] for j in call])
        return padded <= MERGE_PAD_LIMIT * real

    order = sorted(range(len(g.buckets)), key=lambda i: (g.buckets[i].n_t + g.buckets[i].n_s, i))
    return greedy_merge(order, fits)


def _call_shape(buckets: list[list[Any]]) -> tuple[int, int, int, int]:
    """``(M, n_a, n_b, n_s)`` of one call: the largest over its groups (rows = the group's
    buckets' modules) and buckets."""
    flat = [b for bs in buckets for b in bs]
    return (max(sum(len(b.modules) for b in bs) for bs in buckets), max(b.n_a for b in flat),
            max(b.n_b for b in flat), max(b.n_s for b in flat))


def _pad_to(x: Array, n: int, axis: int) -> Array:
    if x.shape[axis] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths)


def _exact(buckets: list[Any], shape: tuple[int, int, int, int]) -> bool:
    """One bucket that already has the call's shape (nothing to pad)."""
    b = buckets[0]
    return len(buckets) == 1 and (len(b.modules), b.n_a, b.n_b, b.n_s) == tuple(shape)


def padded_call(ctxs: list[Mapping[str, Any]], buckets: list[Any],
                shape: tuple[int, int, int, int], mode: str, max_pos: int, *,
                plain: bool) -> dict[str, Array]:
    """One group's buckets as the inputs of a call of ``shape`` ``(M, n_a, n_b, n_s)``: each
    bucket's ``A^T`` and B tokens padded to ``n_a`` and ``n_b``, its source tokens to ``n_s``,
    the modules concatenated and padded to ``M`` rows (zeros). With any padding, ``n_src``
    (real source tokens per row) and ``q_pos`` (each row's query positions, its own ``n_a``
    first: the positions of the unpadded call; clipped below ``max_pos`` on padded queries)
    come along; ``plain`` (no group of the call needs padding): the contexts as they are."""
    M, n_a, n_b, n_s = shape
    if plain:
        return {k: jnp.asarray(ctxs[0][k]) for k in ("tgt", "tgt_s", "src", "src_s")}
    out: dict[str, list[Array]] = {k: [] for k in ("tgt", "tgt_s", "src", "src_s")}
    n_src, n_as = [], []
    for c, b in zip(ctxs, buckets, strict=True):
        for k in ("tgt", "tgt_s"):
            x = jnp.asarray(c[k])
            out[k].append(jnp.concatenate([_pad_to(x[:, : b.n_a], n_a, 1),
                                           _pad_to(x[:, b.n_a:], n_b, 1)], axis=1))
        for k in ("src", "src_s"):
            out[k].append(_pad_to(jnp.asarray(c[k]), n_s, 1))
        n_src += [b.n_s] * len(b.modules)
        n_as += [b.n_a] * len(b.modules)
    res = {k: _pad_to(jnp.concatenate(v), M, 0) for k, v in out.items()}
    rows = len(n_src)
    res["n_src"] = jnp.asarray(np.pad(n_src, (0, M - rows)), jnp.int32)
    na = np.pad(n_as, (0, M - rows))[:, None]
    b_pos = na + np.arange(n_b)[None]
    a_pos = np.broadcast_to(np.arange(n_a)[None], (M, n_a))
    q = {"b_only": b_pos, "a_only": a_pos,
         "ab_joint": np.concatenate([a_pos, b_pos], axis=1)}[mode]
    res["q_pos"] = jnp.asarray(np.minimum(q, max_pos - 1), jnp.int32)
    return res


def _target_tokens(x: Array, n_a: int, n_b: int, n_a_pad: int) -> Array:
    """A padded call's ``A^T`` + B token axis (1) back to a bucket's ``n_a`` + ``n_b``."""
    if n_a == n_a_pad:
        return x[:, : n_a + n_b]
    return jnp.concatenate([x[:, :n_a], x[:, n_a_pad: n_a_pad + n_b]], axis=1)


def unpadded_outputs(out: tuple[Array, ...], buckets: list[Any],
                     shape: tuple[int, int, int, int], mode: str) -> list[tuple[Array, ...]]:
    """One group's ``(delta, attn, z_t, z_s)`` of a `padded_call` back per bucket: its
    modules, its real tokens, in the layout of an unpadded call."""
    n_a_pad = shape[1]
    if _exact(buckets, shape):
        return [out]
    delta, attn, z_t, z_s = out
    parts, lo = [], 0
    for b in buckets:
        hi = lo + len(b.modules)

        def queries(x: Array, b: Any = b) -> Array:
            if mode == "b_only":
                return x[:, : b.n_b]
            if mode == "a_only":
                return x[:, : b.n_a]
            return _target_tokens(x, b.n_a, b.n_b, n_a_pad)

        parts.append((queries(delta[lo:hi]), queries(attn[lo:hi, :, : b.n_s]),
                      _target_tokens(z_t[lo:hi], b.n_a, b.n_b, n_a_pad), z_s[lo:hi, : b.n_s]))
        lo = hi
    return parts


def _stack_trees(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def cluster_key(cluster: list[Group]) -> str:
    """The name of a `group_clusters` cluster in `pack_nets`' tree: its groups joined by +."""
    return "+".join(g.name for g in cluster)


def pack_nets(nets: Mapping[str, Any], plan: FusionPlan) -> dict[str, Any]:
    """``{group: params}`` as ``{cluster: params}`` (`group_clusters`): a cluster of several
    groups has its groups' parameters stacked on a new leading axis (in cluster order), a
    cluster of one keeps its group's. The training step keeps this layout, so that the
    vmapped network call, the optimizer and the gradient norm see a few large arrays
    instead of one per group and leaf (docs/performance.md §6). Works on jax and numpy
    leaves; `hfjax.sharding.packed_specs` packs their partition specs alike."""
    out = {}
    for cluster in group_clusters(plan):
        trees = [nets[g.name] for g in cluster]
        if len(cluster) == 1:
            out[cluster_key(cluster)] = trees[0]
        else:
            out[cluster_key(cluster)] = jax.tree.map(
                lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs),
                *trees)
    return out


def unpack_nets(packed: Mapping[str, Any], plan: FusionPlan) -> dict[str, Any]:
    """The inverse of `pack_nets`: ``{group: params}``, in plan order."""
    per_group = {}
    for cluster in group_clusters(plan):
        tree = packed[cluster_key(cluster)]
        if len(cluster) == 1:
            per_group[cluster[0].name] = tree
        else:
            for i, g in enumerate(cluster):
                per_group[g.name] = jax.tree.map(lambda x, i=i: x[i], tree)
    return {g.name: per_group[g.name] for g in plan.groups}


def nets_of(params: Mapping[str, Any], plan: FusionPlan) -> dict[str, Any]:
    """``{group: network params}`` from a ``{"nets"}`` or a ``{"clusters"}`` (packed) tree."""
    return unpack_nets(params["clusters"], plan) if "clusters" in params else dict(params["nets"])


def _group_dims(g: Group) -> tuple[int, int] | None:
    """``(d_in, d_out)`` shared by every module of ``g`` (None if they differ: a hand-made
    plan; such a group's factors are a tuple of per-module arrays instead of one array)."""
    dims = {(m.d_in, m.d_out) for m in g.modules}
    return dims.pop() if len(dims) == 1 else None


def _module_order(g: Group) -> tuple[int, ...] | None:
    """Where ``g.modules[i]`` sits in the buckets' concatenated modules (None: in place)."""
    flat = [m.name for b in g.buckets for m in b.modules]
    order = tuple(flat.index(m.name) for m in g.modules)
    return None if order == tuple(range(len(order))) else order


def _in_order(parts: list[Any], order: tuple[int, ...] | None) -> Any:
    if isinstance(parts[0], list):  # per-module arrays (modules of several shapes)
        flat = [x for p in parts for x in p]
        return tuple(flat if order is None else [flat[i] for i in order])
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return x if order is None else jnp.take(x, jnp.asarray(order), axis=0)


def split_groups(stacked: Mapping[str, Array], plan: FusionPlan) -> dict[str, Array]:
    """Group-stacked arrays (`predict_group_deltas`, `fused_group`) as ``{module name: array}``."""
    out = {}
    for g in plan.groups:
        if g.name in stacked:
            for i, m in enumerate(g.modules):
                out[m.name] = stacked[g.name][i]
    return out


def stack_groups(per_module: Mapping[str, Any], plan: FusionPlan) -> dict[str, Any]:
    """The inverse of `split_groups`: ``{group: (M_g, ...)}`` in ``g.modules`` order (a tuple
    of the modules' arrays for a group whose modules differ in shape)."""
    out: dict[str, Any] = {}
    for g in plan.groups:
        arrays = [jnp.asarray(per_module[m.name]) for m in g.modules]
        out[g.name] = jnp.stack(arrays) if _group_dims(g) else tuple(arrays)
    return out


def predict_deltas(
    params: Mapping[str, Any],
    contexts: Mapping[str, Any],
    plan: FusionPlan,
    **kwargs: Any,
) -> tuple[dict[str, Array], dict[str, Array], dict[str, list[dict[str, Array]]]]:
    """Run every group's network on its buckets and un-block what ``plan.update_mode``
    patches (docs/algorithm.md §4, §11).

    The decoded rows of one module are un-blocked like the original: B from the B tokens,
    ``ΔB = delta_B_rows.reshape(-1, r)[:d_out]``; A from the ``A^T`` tokens,
    ``ΔA = delta_A_rows.reshape(-1, r)[:d_in].T``, shape ``(r, d_in)`` like PEFT's A.

    Args:
        params: ``init_fusion_params``'s tree (``"nets"`` is used; ``"alpha"`` ignored).
        contexts: ``build_contexts``'s output (numpy or jax arrays; a pytree).
        plan: the plan the contexts were built from (static).
        kwargs: the network's settings (`predict_group_deltas`): ``embed_dim``,
            ``num_heads``, ``max_pos``, ``mu_gate``, ``gate``; ``dtype`` and ``col_view``
            (see :class:`TransferNet`; they do not change the parameters); ``stack_groups``
            (run same-shaped groups as one vmapped call, `group_clusters`; the parameter
            tree stays one entry per group).

    Returns:
        ``delta_A``: ``{module name: (r, d_in) float32}`` (a_only / ab_joint, else empty),
        ``delta_B``: ``{module name: (d_out, r) float32}`` (b_only / ab_joint, else empty)
        for every fused module, and ``aux``: ``{group: [per bucket {"z_t", "z_s", "attn"}]}``
        (for the RDM and reports; ``attn`` covers the decoded tokens).
    """
    delta_A, delta_B, aux = predict_group_deltas(params, contexts, plan, **kwargs)
    return split_groups(delta_A, plan), split_groups(delta_B, plan), aux


def predict_delta_B(
    params: Mapping[str, Any],
    contexts: Mapping[str, Any],
    plan: FusionPlan,
    **kwargs: Any,
) -> tuple[dict[str, Array], dict[str, list[dict[str, Array]]]]:
    """`predict_deltas` without ΔA: ``(delta_B, aux)`` (empty ``delta_B`` for an a_only plan).

    Keyword arguments are `predict_deltas`'s.
    """
    _, delta_B, aux = predict_deltas(params, contexts, plan, **kwargs)
    return delta_B, aux


def group_clusters(plan: FusionPlan) -> list[list[Group]]:
    """Groups whose networks run as ONE vmapped call (stacked parameters), in plan order.

    Groups of identical token and module counts always share a call. Other groups of the same
    rank (networks of the same shapes) join one when their calls (`merged_calls`) padded to
    common counts (`padded_call`: exact) add at most ``MERGE_PAD_LIMIT`` times the real tokens
    AND at most ``CLUSTER_PAD_BUDGET`` padded token values in all: small calls (the demo's)
    merge, since a kernel costs compile time whatever its size, while the paper's large ones
    are not padded, since there the padding would cost run time on every step. In the paper's
    setting (all-linear LoRA) the 7 groups become three batched networks (down; gate and up;
    the attention projections).
    Fewer, larger kernels run faster and compile much faster; the values are those of the
    per-group loop.
    """
    clusters: list[list[Group]] = []
    for g in plan.groups:
        for c in clusters:
            if c[0].rank == g.rank and _cluster_fits([*c, g], plan.block_size):
                c.append(g)
                break
        else:
            clusters.append([g])
    return clusters


CLUSTER_PAD_BUDGET = 2**20  # padded token values (tokens x block_size x rank) a cluster may add


def _cluster_fits(cluster: list[Group], block_size: int) -> bool:
    calls = [merged_calls(g) for g in cluster]
    if len({len(c) for c in calls}) != 1:
        return False
    real = padded = 0
    for parts in zip(*calls, strict=True):
        buckets = [[g.buckets[bi] for bi in call] for g, call in zip(cluster, parts,
                                                                   strict=True)]
        M, n_a, n_b, n_s = _call_shape(buckets)
        real += sum(_tokens(bs)[0] for bs in buckets)
        padded += len(cluster) * M * (n_a + n_b + n_s)
    extra = (padded - real) * block_size * cluster[0].rank
    return padded == real or (padded <= MERGE_PAD_LIMIT * real and extra <= CLUSTER_PAD_BUDGET)


def fused_group(
    target: Mapping[str, Array],
    delta: Mapping[str, Array],
    alpha: Mapping[str, Array],
    plan: FusionPlan,
) -> dict[str, Array]:
    """``target_g + alpha_g * Δ_g`` (float32) per group, on group-stacked arrays
    (`stack_groups` of the target's B or A; `predict_group_deltas`' ΔB or ΔA); pure and
    differentiable. `split_groups` of it equals `fused_B` / `fused_A`."""
    out = {}
    for g in plan.groups:
        if g.name in delta:
            a = jnp.asarray(alpha[g.name], jnp.float32)
            out[g.name] = jax.tree.map(lambda t, d, a=a: jnp.asarray(t, jnp.float32) + a * d,
                                       target[g.name], delta[g.name])
    return out


def fused_B(
    target_B: Mapping[str, Any],
    delta_B: Mapping[str, Array],
    alpha: Mapping[str, Array],
    plan: FusionPlan,
) -> dict[str, Array]:
    """``B_t + alpha_g * ΔB`` (float32) for every fused module (docs/algorithm.md §5); pure and
    differentiable.

    Modules the plan leaves unfused are not in the result: use the target's B for them.
    """
    out = {}
    for g in plan.groups:
        a = jnp.asarray(alpha[g.name], dtype=jnp.float32)
        for m in g.modules:
            out[m.name] = jnp.asarray(target_B[m.name], dtype=jnp.float32) + a * delta_B[m.name]
    return out


def fused_A(
    target_A: Mapping[str, Any],
    delta_A: Mapping[str, Array],
    alpha: Mapping[str, Array],
    plan: FusionPlan,
) -> dict[str, Array]:
    """``A_t + alpha_g * ΔA`` (float32) for every fused module (docs/algorithm.md §11: a_only /
    ab_joint);
    the same alpha as B's. Pure and differentiable; unfused modules are not in the result."""
    return fused_B(target_A, delta_A, alpha, plan)  # the same per-module update


def param_count(params: Any) -> int:
    """Number of scalars in a pytree (boxed or not)."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


@functools.cache
def net_param_count(block_size: int, rank: int, embed_dim: int, num_heads: int = 8,
                    max_pos: int = 4096, gate: str = "svd") -> int:
    """Parameters of one network, analytically (no allocation): docs/algorithm.md §4 quotes ≈110M at
    block 4096, r 8, E 1024."""
    F, E = block_size * rank, embed_dim
    n = 2 * F  # input_norm
    n += 2 * (F * E + E)  # proj_row, proj_col
    if gate == "svd":
        n += rank * (E // 4) + E // 4 + (E // 4) * E + E
    n += 2 * E  # fusion_norm
    n += max_pos * E
    n += 4 * (E * E + E)
    n += E * E + E + E * F + F
    return n
