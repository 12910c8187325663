"""Homogeneous LoRA merges (sources share the target's base), computed as PEFT computes them.

These are the baselines HeteroFusion is compared with when every expert was trained on the
same base model. Two kinds of operation:

1. `merge_adapters`: PEFT's ``add_weighted_adapter`` for every ``combination_type``. Three
   adapters of rank 4 on a model with ``q_proj`` (32 -> 32)::

       merged = merge_adapters([a, b, c], [0.5, 0.3, 0.2], "ties", density=0.5)
       merged.modules["model.layers.0.self_attn.q_proj"].A.shape    # (4, 32), scale 1.0

   - ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the A's and the
     B's are merged *separately* (stacked ``(3, 4, 32)`` and ``(3, 32, 4)``), each with weight
     ``sqrt(|w_i · scale_i|)`` (the sign goes on A only). The rank stays 4.
   - ``cat``: ``A = concat_i(w_i · scale_i · A_i)``, ``B = concat_i(B_i)``: exact, rank 12
     (the sum of the sources' ranks; rows of a source that lacks a module stay zero).
   - ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``:
     the full ``ΔW_i = scale_i · B_i A_i`` (``(3, 32, 32)``) are merged, then truncated to
     ``svd_rank`` (default: the largest source rank; at most the matrix's smaller side) by
     SVD: ``B = U_r S_r``, ``A = Vh_r``. Singular vectors are fixed only up to sign, so these
     factors may differ from PEFT's by a sign per component; ``B A`` does not.

   The merged adapter has ``lora_alpha == r`` (scale 1): the sources' scales (alpha / r, or
   alpha / sqrt(r) with rsLoRA, per module) are folded into the tensors. PEFT copies
   ``use_rslora`` from the first source, which makes its merge of rsLoRA sources ``sqrt(r)``
   times too strong; we write ``use_rslora: false`` and keep the delta the tensors encode.
   As in PEFT, a module only some sources adapt is merged over those sources. Refused with a
   `MergeError` naming the adapter and the module: a module whose base shape differs between
   sources, and (for the stacking types) sources of different ranks.

2. `project_to_target`: a source's delta expressed in the target's A (the closed-form
   "target-basis projection"), ``scale_t · B* A_t ≈ ΔW_s`` in least squares::

       B* = ΔW_s · pinv(A_t) / scale_t = (scale_s / scale_t) · B_s (A_s pinv(A_t))

   computed without forming ``ΔW_s`` (``(d_out, r_s) @ (r_s, r_t)``).

The tensor functions (`task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
`magnitude_prune`, `prune`, `majority_sign_mask`, `disjoint_merge`) mirror
``peft.utils.merge_utils`` on tensors stacked on axis 0. DARE's random drop takes either a
JAX ``key`` or the keep-masks themselves (``masks``), so a merge can be replayed exactly
(the tests replay the masks PEFT draws with ``torch.bernoulli``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from bridge.lora_adapter import LoraAdapter, LoraModule
from hfjax.errors import UserError

__all__ = [
    "COMBINATION_TYPES",
    "MergeError",
    "dare_linear",
    "dare_ties",
    "disjoint_merge",
    "magnitude_prune",
    "majority_sign_mask",
    "merge_adapters",
    "project_to_target",
    "prune",
    "random_keep_mask",
    "task_arithmetic",
    "ties",
]

SignMethod = Literal["total", "frequency"]
# Merged per tensor kind: A's and B's separately (PEFT's `_generalized_task_arithmetic...`).
_FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Merged on full delta weights, then truncated by SVD (`_svd_generalized_task_arithmetic...`).
_SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*_FACTOR_TYPES, "cat", *_SVD_TYPES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


class MergeError(UserError):
    """Adapters that cannot be merged, or merge arguments that make no sense (one line)."""


# ------------------------------------------------------------------------------------------
# Tensor merges: ``tensors`` stacked on axis 0 (n, ...), ``weights`` (n,)
# ------------------------------------------------------------------------------------------


def _weighted(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    w = jnp.asarray(weights, tensors.dtype)
    return tensors * w.reshape(w.shape + (1,) * (tensors.ndim - 1))


def task_arithmetic(tensors: jax.Array, weights: jax.Array) -> jax.Array:
    """``Σ_i w_i · t_i``."""
    return _weighted(tensors, weights).sum(axis=0)


def _magnitude_keep(tensor: jax.Array, density: float) -> jax.Array:
    """1 at the ``int(density · size)`` largest ``|t|`` entries, 0 elsewhere (as ``torch.topk``)."""
    k = int(density * tensor.size)
    flat = jnp.zeros(tensor.size, tensor.dtype)
    if k > 0:
        _, idx = jax.lax.top_k(jnp.abs(tensor).reshape(-1), k)
        flat = flat.at[idx].set(1)
    return flat.reshape(tensor.shape)


_CHUNK = 1 << 16  # entries per Bernoulli draw: one compiled shape for every tensor


@jax.jit
def _bernoulli_chunk(key: jax.Array, index: int, density: float) -> jax.Array:
    return jax.random.bernoulli(jax.random.fold_in(key, index), density, (_CHUNK,))


def random_keep_mask(key: jax.Array, density: float, shape: tuple[int, ...]) -> jax.Array:
    """Bernoulli(``density``) keep-mask of ``shape`` (bool), drawn in fixed-size chunks so that
    one compiled sampler serves every tensor shape (threefry compiles slowly on CPU)."""
    size = math.prod(shape)
    chunks = [_bernoulli_chunk(key, i, density) for i in range(-(-size // _CHUNK))]
    return jnp.concatenate(chunks)[:size].reshape(shape)


def prune(tensor: jax.Array, density: float, method: Literal["magnitude", "random"], *,
          rescale: bool = False, key: jax.Array | None = None,
          mask: jax.Array | None = None) -> jax.Array:
    """Keep a ``density`` fraction of one tensor's entries (``density >= 1`` keeps all).

    ``magnitude``: the largest by absolute value. ``random``: each entry kept with probability
    ``density`` (``mask`` given, or drawn from ``key``), divided by ``density`` if ``rescale``.
    """
    if density >= 1:
        return tensor
    if density < 0:
        raise MergeError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return tensor * _magnitude_keep(tensor, density)
    if method != "random":
        raise MergeError(f"unknown prune method {method!r} (magnitude or random)")
    if mask is None:
        if key is None:
            raise MergeError("random pruning needs a key or a mask")
        mask = random_keep_mask(key, density, tensor.shape)
    out = tensor * jnp.asarray(mask, tensor.dtype)
    return out / jnp.asarray(density, tensor.dtype) if rescale else out


def majority_sign_mask(tensors: jax.Array, method: SignMethod = "total") -> jax.Array:
    """True where an entry's sign is the elected one: the sign of ``Σ_i t_i`` (``total``) or of
    ``Σ_i sign(t_i)`` (``frequency``); ties elect +. Zeros never agree."""
    sign = jnp.sign(tensors)
    if method == "total":
        votes = tensors.sum(axis=0)
    elif method == "frequency":
        votes = sign.sum(axis=0)
    else:
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    return sign == jnp.where(votes >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(tensors: jax.Array, sign_mask: jax.Array) -> jax.Array:
    """The mean over the sources that agree with the elected sign (0 where none does)."""
    kept = jnp.asarray(sign_mask, tensors.dtype)
    return (tensors * kept).sum(axis=0) / jnp.maximum(kept.sum(axis=0), 1.0)


def _prune_each(tensors: jax.Array, density: float, method: Literal["magnitude", "random"],
                key: jax.Array | None, masks: jax.Array | None) -> jax.Array:
    """`prune` applied to each stacked tensor; random keep-masks are ``masks`` or one draw of
    shape ``tensors.shape`` from ``key``."""
    if density >= 1 or method == "random" and masks is None and key is None:
        return jnp.stack([prune(t, density, method, key=key) for t in tensors])  # checks
    if density < 0:
        raise MergeError(f"density must be >= 0, got {density}")
    if method == "magnitude":
        return tensors * jax.vmap(lambda t: _magnitude_keep(t, density))(tensors)
    if masks is None:
        masks = random_keep_mask(key, density, tensors.shape)
    return tensors * jnp.asarray(masks, tensors.dtype) / jnp.asarray(density, tensors.dtype)


def magnitude_prune(tensors: jax.Array, weights: jax.Array, density: float) -> jax.Array:
    """Magnitude-prune each source, then task arithmetic."""
    return task_arithmetic(_prune_each(tensors, density, "magnitude", None, None), weights)


def ties(tensors: jax.Array, weights: jax.Array, density: float,
         majority_sign_method: SignMethod = "total") -> jax.Array:
    """TIES: trim by magnitude, elect the sign (of the trimmed, unweighted tensors), and take
    the disjoint mean of the weighted ones."""
    trimmed = _prune_each(tensors, density, "magnitude", None, None)
    signs = majority_sign_mask(trimmed, majority_sign_method)
    return disjoint_merge(_weighted(trimmed, weights), signs)


def dare_linear(tensors: jax.Array, weights: jax.Array, density: float, *,
                key: jax.Array | None = None, masks: jax.Array | None = None) -> jax.Array:
    """DARE: drop entries at random (keep-``masks`` (n, ...) or ``key``), rescale by
    1 / density, then task arithmetic."""
    return task_arithmetic(_prune_each(tensors, density, "random", key, masks), weights)


def dare_ties(tensors: jax.Array, weights: jax.Array, density: float,
              majority_sign_method: SignMethod = "total", *, key: jax.Array | None = None,
              masks: jax.Array | None = None) -> jax.Array:
    """DARE's random drop and rescale, then TIES' sign election and disjoint merge."""
    dropped = _prune_each(tensors, density, "random", key, masks)
    signs = majority_sign_mask(dropped, majority_sign_method)
    return disjoint_merge(_weighted(dropped, weights), signs)


@partial(jax.jit, static_argnames=("kind", "density", "sign_method"))
def _combine(kind: str, tensors: jax.Array, weights: jax.Array, density: float | None,
             sign_method: SignMethod, masks: jax.Array | None) -> jax.Array:
    """One stacked merge; ``kind`` is a combination type without its ``_svd`` suffix; DARE's
    keep-``masks`` are drawn outside (see `random_keep_mask`)."""
    if kind in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if kind == "ties":
        return ties(tensors, weights, density, sign_method)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, masks=masks)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, sign_method, masks=masks)
    raise AssertionError(kind)


@partial(jax.jit, static_argnames=("rank",))
def _svd_factors(delta: jax.Array, rank: int, clamp: float | None
                 ) -> tuple[jax.Array, jax.Array]:
    """``(A, B) = (Vh_r, U_r S_r)``, optionally clamped to the ``clamp`` quantile of their
    entries (as PEFT's ``svd_clamp``)."""
    u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = jnp.clip(b, -hi, hi), jnp.clip(a, -hi, hi)
    return a, b


# ------------------------------------------------------------------------------------------
# Adapter merges
# ------------------------------------------------------------------------------------------


def _name(adapter: LoraAdapter, i: int) -> str:
    return adapter.path or f"adapter {i}"


def _config_rank(adapter: LoraAdapter) -> int:
    """PEFT's rank of an adapter for merging: ``max(r, *rank_pattern.values())``."""
    cfg = adapter.config
    if "r" in cfg:
        return max([int(cfg["r"]), *(cfg.get("rank_pattern") or {}).values()])
    return max(m.rank for m in adapter.modules.values())


def _check_shapes(adapters: Sequence[LoraAdapter]) -> dict[str, list[int]]:
    """Module name -> indices of the sources adapting it; refuse a module whose base shape
    (d_out, d_in) differs between sources."""
    seen: dict[str, tuple[int, LoraModule]] = {}
    holders: dict[str, list[int]] = {}
    for i, adapter in enumerate(adapters):
        for name, m in adapter.modules.items():
            if name in seen:
                j, first = seen[name]
                if (m.d_out, m.d_in) != (first.d_out, first.d_in):
                    raise MergeError(
                        f"{_name(adapter, i)}: module {name} adapts a ({m.d_out}, {m.d_in}) "
                        f"weight but {_name(adapters[j], j)} adapts ({first.d_out}, "
                        f"{first.d_in}); the adapters are for different base models"
                    )
            else:
                seen[name] = (i, m)
            holders.setdefault(name, []).append(i)
    return holders


def _merged_config(adapters: Sequence[LoraAdapter], modules: Mapping[str, LoraModule]
                   ) -> dict[str, Any]:
    """The first source's config with scale 1 everywhere and the sources' targets united."""
    cfg = {k: v for k, v in adapters[0].config.items()
           if k not in ("rank_pattern", "alpha_pattern", "target_modules", "layers_to_transform",
                        "layers_pattern", "exclude_modules")}
    ranks = [m.rank for m in modules.values()]
    r = max(set(ranks), key=lambda v: (ranks.count(v), -v))
    extra = {name.replace(".", r"\."): m.rank for name, m in modules.items() if m.rank != r}
    targets = [a.config.get("target_modules") for a in adapters]
    plain = all(isinstance(a.config.get("target_modules"), list)
                and not a.config.get("layers_to_transform") and not a.config.get("exclude_modules")
                for a in adapters)
    cfg.update(
        r=r, lora_alpha=r, use_rslora=False, rank_pattern=extra, alpha_pattern=dict(extra),
        # PEFT unites list targets; otherwise name exactly the merged modules.
        target_modules=sorted({t for ts in targets for t in ts}) if plain else sorted(modules),
    )
    return cfg


def merge_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    combination_type: str = "svd",
    *,
    density: float | None = None,
    majority_sign_method: SignMethod = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    key: jax.Array | None = None,
    masks: Mapping[str, Mapping[str, Any]] | None = None,
) -> LoraAdapter:
    """Merge same-base LoRA adapters as ``PeftModel.add_weighted_adapter`` does.

    ``weights`` may be negative. ``density`` (in [0, 1]) is required by the pruning types.
    DARE types drop entries at random: pass ``key`` (a ``jax.random`` key) or ``masks``:
    ``{module: {"A": (n, r, d_in), "B": (n, d_out, r)}}`` for ``dare_linear`` / ``dare_ties``,
    ``{module: {"delta": (n, d_out, d_in)}}`` for their ``_svd`` variants, stacked over the n
    sources adapting that module, in source order (1 = keep). One source means ``linear``,
    as in PEFT. Returns an adapter of scale 1 (``lora_alpha == r``) that `bridge.save_adapter`
    writes for ``PeftModel.from_pretrained``.
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    if not adapters:
        raise MergeError("merge_adapters needs at least one adapter")
    if len(weights) != len(adapters):
        raise MergeError(f"{len(weights)} weights for {len(adapters)} adapters")
    if combination_type not in COMBINATION_TYPES:
        raise MergeError(f"combination_type {combination_type!r} is not one of "
                         f"{', '.join(COMBINATION_TYPES)}")
    kind = "linear" if len(adapters) == 1 else combination_type
    base = kind.removesuffix("_svd")
    if base in _NEEDS_DENSITY:
        if density is None or not 0 <= density <= 1:
            raise MergeError(f"{combination_type} needs a density in [0, 1], got {density}")
        density = float(density)
    if base in _NEEDS_DENSITY and majority_sign_method not in ("total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', "
                         f"got {majority_sign_method!r}")
    if base.startswith("dare") and key is None and masks is None:
        raise MergeError(f"{combination_type} drops entries at random: pass a key or masks")
    if svd_rank is not None and svd_rank <= 0:
        raise MergeError(f"svd_rank must be a positive integer, got {svd_rank}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise MergeError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp}")
    holders = _check_shapes(adapters)
    if kind in _FACTOR_TYPES:
        ranks = {_config_rank(a) for a in adapters}
        if len(ranks) > 1:
            raise MergeError(f"{combination_type} needs sources of one rank, got "
                             + ", ".join(f"{_name(a, i)}: r={_config_rank(a)}"
                                         for i, a in enumerate(adapters)))
    new_rank = svd_rank or max(_config_rank(a) for a in adapters)
    cat_rank = sum(_config_rank(a) for a in adapters)
    if base.startswith("dare") and masks is not None:
        _check_masks(masks, holders, adapters, "delta" if kind.endswith("_svd") else "AB",
                     complete=key is None)

    out: dict[str, LoraModule] = {}
    for index, (name, who) in enumerate(holders.items()):
        mods = [adapters[i].modules[name] for i in who]
        w = [weights[i] * m.scale for i, m in zip(who, mods, strict=True)]
        mod_masks = (masks or {}).get(name, {})
        how = dict(kind=base, density=density, sign_method=majority_sign_method, key=key,
                   masks=mod_masks, name=name, index=index)
        dtype = mods[0].A.dtype  # PEFT casts to the first source's dtype
        if kind == "cat":
            a = np.concatenate([np.asarray(m.A, np.float32) * wi
                                for m, wi in zip(mods, w, strict=True)])
            b = np.concatenate([np.asarray(m.B, np.float32) for m in mods], axis=1)
            pad = cat_rank - a.shape[0]  # PEFT's cat rank: every source's r, zeros unused
            a, b = np.pad(a, ((0, pad), (0, 0))), np.pad(b, ((0, 0), (0, pad)))
        elif kind in _FACTOR_TYPES:
            if len({m.rank for m in mods}) > 1:
                raise MergeError(
                    f"{_name(adapters[who[-1]], who[-1])}: module {name} has rank "
                    f"{mods[-1].rank} but {_name(adapters[who[0]], who[0])} has "
                    f"{mods[0].rank}; {combination_type} stacks the factors and needs one rank"
                )
            root = [math.sqrt(abs(x)) for x in w]
            signed = [r if x >= 0 else -r for r, x in zip(root, w, strict=True)]
            w_a = jnp.asarray(signed, jnp.float32)
            w_b = jnp.asarray(root, jnp.float32)
            a = _merge_stack(jnp.stack([jnp.asarray(m.A, jnp.float32) for m in mods]), w_a,
                             "A", **how)
            b = _merge_stack(jnp.stack([jnp.asarray(m.B, jnp.float32) for m in mods]), w_b,
                             "B", **how)
        else:
            deltas = jnp.stack([
                m.scale * (jnp.asarray(m.B, jnp.float32) @ jnp.asarray(m.A, jnp.float32))
                for m in mods
            ])
            w_d = jnp.asarray([weights[i] for i in who], jnp.float32)
            delta = _merge_stack(deltas, w_d, "delta", **how)
            rank = min(new_rank, *delta.shape)
            a, b = _svd_factors(delta, rank, None if svd_clamp is None else float(svd_clamp))
        out[name] = LoraModule(name=name, A=np.asarray(a).astype(dtype),
                               B=np.asarray(b).astype(dtype), scale=1.0)
    return LoraAdapter(config=_merged_config(adapters, out), modules=out)


def _merge_stack(stacked: jax.Array, weights: jax.Array, label: str, *, kind: str,
                 density: float | None, sign_method: SignMethod, key: jax.Array | None,
                 masks: Mapping[str, Any], name: str, index: int) -> jax.Array:
    """Merge one module's stacked ``label`` tensors (A, B or delta); DARE's keep-masks come
    from ``masks`` or are drawn from ``key`` folded with the module index and ``label``."""
    keep = _given_mask(masks, label, name, stacked.shape)
    if keep is None and kind.startswith("dare") and density < 1:
        if key is None:
            raise MergeError(f"masks has no {label!r} entry for module {name}; pass masks for "
                             "every module, or a key")
        sub = jax.random.fold_in(jax.random.fold_in(key, index), ("A", "B", "delta").index(label))
        keep = random_keep_mask(sub, density, stacked.shape)
    return _combine(kind, stacked, weights, density, sign_method, keep)


def _check_masks(masks: Mapping[str, Mapping[str, Any]], holders: Mapping[str, list[int]],
                 adapters: Sequence[LoraAdapter], labels: str, *, complete: bool) -> None:
    """Refuse, before any work, caller masks for unknown modules or of the wrong shape, and
    (``complete``: no key to draw the rest) masks that leave a module out."""
    names = ("delta",) if labels == "delta" else ("A", "B")
    for name, per_label in masks.items():
        if name not in holders:
            raise MergeError(f"masks names module {name!r}, which no source adapts")
        mods = [adapters[i].modules[name] for i in holders[name]]
        want = {"A": (len(mods), *mods[0].A.shape), "B": (len(mods), *mods[0].B.shape),
                "delta": (len(mods), mods[0].d_out, mods[0].d_in)}
        for label in per_label:
            if label not in names:
                raise MergeError(f"masks[{name!r}] has a {label!r} entry; this merge takes "
                                 + ("'delta'" if labels == "delta" else "'A' and 'B'"))
            _given_mask(per_label, label, name, want[label])
    for name in holders if complete else ():
        for label in names:
            if label not in masks.get(name, {}):
                raise MergeError(f"masks has no {label!r} entry for module {name}; pass masks "
                                 "for every module, or a key")


def _given_mask(mod_masks: Mapping[str, Any], label: str, name: str,
                shape: tuple[int, ...]) -> jax.Array | None:
    """The caller's keep-mask for one stacked tensor of module ``name``, shape-checked."""
    if label not in mod_masks:
        return None
    keep = jnp.asarray(mod_masks[label], jnp.float32)
    if keep.shape != tuple(shape):
        raise MergeError(f"masks[{name!r}][{label!r}] has shape {keep.shape}; the {label} of "
                         f"the sources adapting {name}, stacked, have shape {tuple(shape)}")
    return keep


# ------------------------------------------------------------------------------------------
# Target-basis projection
# ------------------------------------------------------------------------------------------


@jax.jit
def _project(b_s: jax.Array, a_s: jax.Array, a_t: jax.Array, ratio: jax.Array) -> jax.Array:
    return ratio * (b_s @ (a_s @ jnp.linalg.pinv(a_t)))


def project_to_target(source: LoraAdapter, target: LoraAdapter) -> LoraAdapter:
    """``source``'s deltas written in ``target``'s A: a copy of ``target`` whose B's are
    ``B* = ΔW_s · pinv(A_t) / scale_t`` (its A's and scales unchanged).

    ``scale_t · B* A_t`` is the least-squares closest delta to ``ΔW_s`` in the row space of
    ``A_t`` (exact when ``A_s``'s rows lie in it). A target module the source does not adapt
    gets ``B* = 0``; a source module the target does not adapt, or a base shape that differs,
    is refused.
    """
    src, tgt = source.path or "source adapter", target.path or "target adapter"
    for name, m in source.modules.items():
        t = target.modules.get(name)
        if t is None:
            raise MergeError(f"{src}: module {name} is not adapted by the target {tgt}; "
                             "its delta has no target A to be written in")
        if (m.d_out, m.d_in) != (t.d_out, t.d_in):
            raise MergeError(f"{src}: module {name} adapts a ({m.d_out}, {m.d_in}) weight "
                             f"but the target {tgt} adapts ({t.d_out}, {t.d_in})")
    new_b = {}
    for name, t in target.modules.items():
        m = source.modules.get(name)
        if m is None:
            new_b[name] = np.zeros_like(t.B)
            continue
        b = _project(jnp.asarray(m.B, jnp.float32), jnp.asarray(m.A, jnp.float32),
                     jnp.asarray(t.A, jnp.float32), jnp.float32(m.scale / t.scale))
        new_b[name] = np.asarray(b)
    return target.with_B(new_b)
