"""One declarative table per model: HF checkpoint key <-> our params path, with its hook and axes.

The same table drives loading (HF -> ours) and export (ours -> HF). Each row says::

    ours:  layers.{i}.attn.q_proj.kernel       hook: transpose
    hf:    model.layers.{i}.self_attn.q_proj.weight   axes: (embed, q_heads)

Kernels are stored ``(d_in, d_out)`` (x @ kernel), so HF's ``(out, in)`` Linear weights get a
transpose in both directions; everything else is copied as is. We keep HF's rotate-half RoPE
layout, so q/k need no permutation. Family deltas only add rows (biases, q/k norms, Gemma's
and OLMo 2's norms after attention and MLP) or drop some (``lm_head`` when embeddings are
tied; the pre-norms where OLMo 2 has none). Our norm names say where a norm sits, whatever HF
calls it: ``input_norm`` before attention, ``post_norm`` before the MLP (HF's Llama
``post_attention_layernorm``, Gemma's ``pre_feedforward_layernorm``), ``attn_out_norm`` /
``mlp_out_norm`` on the attention / MLP output (Gemma's and OLMo 2's
``post_attention_layernorm`` / ``post_feedforward_layernorm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from hfjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class KeySpec:
    ours: tuple[Any, ...]  # params path, e.g. ("layers", 3, "attn", "q_proj", "kernel")
    hf: str  # HF checkpoint key
    transpose: bool  # (out, in) Linear weight <-> (in, out) kernel
    axes: tuple[str | None, ...]  # logical axis names of OUR array

    def to_ours(self, x: np.ndarray) -> np.ndarray:
        return x.T if self.transpose else x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T) if self.transpose else x


# (our projection name, HF sub-path, (in axis, out axis)) per projection.
_ATTN = (
    ("q_proj", "self_attn.q_proj", ("embed", "q_heads")),
    ("k_proj", "self_attn.k_proj", ("embed", "kv_heads")),
    ("v_proj", "self_attn.v_proj", ("embed", "kv_heads")),
    ("o_proj", "self_attn.o_proj", ("q_heads", "embed")),
)
_MLP = (
    ("gate_proj", "mlp.gate_proj", ("embed", "mlp")),
    ("up_proj", "mlp.up_proj", ("embed", "mlp")),
    ("down_proj", "mlp.down_proj", ("mlp", "embed")),
)


# Projection names of a decoder layer, derived from the rows above (LoRA targets use them).
ATTN_PROJECTIONS: tuple[str, ...] = tuple(name for name, _, _ in _ATTN)
MLP_PROJECTIONS: tuple[str, ...] = tuple(name for name, _, _ in _MLP)


def key_table(cfg: ModelConfig) -> list[KeySpec]:
    """Every parameter of the model described by ``cfg``, in checkpoint order."""
    rows = [KeySpec(("embed",), "model.embed_tokens.weight", False, ("vocab", "embed"))]
    # HF name of the norm before the MLP, and of the norms on the branch outputs.
    pre_mlp = ("pre_feedforward_layernorm" if cfg.layer_norms == "sandwich"
               else "post_attention_layernorm")
    qk_axes = {"head": (("head_dim",), ("head_dim",)),
               "full": (("q_heads",), ("kv_heads",))}.get(cfg.qk_norm)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."

        def norm(ours: str, hf: str, i: int = i, p: str = p) -> None:
            rows.append(KeySpec(("layers", i, ours), p + hf + ".weight", False, ("norm",)))

        if cfg.layer_norms != "post":
            norm("input_norm", "input_layernorm")
        for name, hf, axes in _ATTN:
            rows.append(KeySpec(("layers", i, "attn", name, "kernel"), p + hf + ".weight", True,
                                axes))
            has_bias = cfg.o_bias if name == "o_proj" else cfg.qkv_bias
            if has_bias:
                rows.append(KeySpec(("layers", i, "attn", name, "bias"), p + hf + ".bias", False,
                                    (axes[1],)))
        if qk_axes is not None:
            for name, axes in zip(("q_norm", "k_norm"), qk_axes, strict=True):
                rows.append(KeySpec(("layers", i, "attn", name), p + f"self_attn.{name}.weight",
                                    False, axes))
        if cfg.layer_norms != "pre":
            norm("attn_out_norm", "post_attention_layernorm")
        if cfg.layer_norms != "post":
            norm("post_norm", pre_mlp)
        for name, hf, axes in _MLP:
            rows.append(KeySpec(("layers", i, "mlp", name, "kernel"), p + hf + ".weight", True,
                                axes))
            if cfg.mlp_bias:
                rows.append(KeySpec(("layers", i, "mlp", name, "bias"), p + hf + ".bias", False,
                                    (axes[1],)))
        if cfg.layer_norms != "pre":
            norm("mlp_out_norm", "post_feedforward_layernorm")
    rows.append(KeySpec(("final_norm",), "model.norm.weight", False, ("norm",)))
    if not cfg.tie_word_embeddings:
        rows.append(KeySpec(("lm_head",), "lm_head.weight", True, ("embed", "vocab")))
    return rows


# HF keys that carry no parameters of ours (buffers some exporters write).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_shape(spec: KeySpec, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape HF stores for ``spec`` (used to check checkpoints before loading)."""
    shape = _our_shape(spec, cfg)
    return shape[::-1] if spec.transpose else shape


def _our_shape(spec: KeySpec, cfg: ModelConfig) -> tuple[int, ...]:
    sizes = {
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "q_heads": cfg.num_attention_heads * cfg.head_dim,
        "kv_heads": cfg.num_key_value_heads * cfg.head_dim,
        "mlp": cfg.intermediate_size,
        "norm": cfg.hidden_size,
        "head_dim": cfg.head_dim,
    }
    return tuple(sizes[a] for a in spec.axes if a is not None)


def our_shape(spec: KeySpec, cfg: ModelConfig) -> tuple[int, ...]:
    return _our_shape(spec, cfg)


def set_path(tree: dict, path: tuple[Any, ...], value: Any) -> None:
    """Insert ``value`` at ``path`` in a nested dict whose integer keys index lists."""
    node: Any = tree
    for k, nxt in zip(path[:-1], path[1:], strict=True):
        child = node[k] if isinstance(node, list) else node.setdefault(
            k, [] if isinstance(nxt, int) else {})
        if isinstance(child, list) and isinstance(nxt, int):
            child.extend({} for _ in range(nxt + 1 - len(child)))
        node = child
    node[path[-1]] = value


def get_path(tree: Any, path: tuple[Any, ...]) -> Any:
    """The leaf at ``path``; in stacked params (``tree["layers"]`` a dict of (N, ...) arrays)
    ``("layers", i, *rest)`` is row ``i`` of the stacked leaf at ``rest``."""
    if path and path[0] == "layers" and isinstance(tree.get("layers"), dict):
        return get_path(tree["layers"], stacked_path(path))[path[1]]
    for k in path:
        tree = tree[k]
    return tree


def stacked_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """``("layers", i, *rest)`` -> ``rest`` (the leaf's path inside the stacked layers)."""
    return tuple(path[2:])


def iter_params(params: dict, cfg: ModelConfig) -> Iterator[tuple[KeySpec, Any]]:
    """(spec, our array) for every row of the table, for export (one layer's slice at a
    time from stacked params)."""
    for spec in key_table(cfg):
        yield spec, get_path(params, spec.ours)


def logical_axes_tree(cfg: ModelConfig, stacked: bool = False) -> dict:
    """A pytree shaped like the params whose leaves are `PartitionSpec`s of logical axis names
    (``stacked``: the layers as one tree of (N, ...) arrays, their layer axis unsharded)."""
    from jax.sharding import PartitionSpec

    tree: dict = {}
    for spec in key_table(cfg):
        if stacked and spec.ours[0] == "layers":
            set_path(tree, ("layers", *stacked_path(spec.ours)), PartitionSpec(None, *spec.axes))
        else:
            set_path(tree, spec.ours, PartitionSpec(*spec.axes))
    return tree
