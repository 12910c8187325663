"""Source controls: contexts whose sources carry no (or misplaced) knowledge (issue #13).

A fused adapter that beats its target may owe the gain to the replay data alone. A control
run trains the same networks on the same replay set with the *source* side of every block
context (docs/algorithm.md §3) replaced, so that "fused vs control" tells whether fusion transferred
anything. Every control keeps shapes, buckets and the plan; target tokens are never touched.

- ``"zero"``: every source token and descriptor is zero (the old ``fusion.zero_sources``).
- ``"noise"``: every source token becomes Gaussian noise with the token's L2 norm, drawn on
  the token's non-zero entries (block padding stays zero, so only content changes);
  descriptors are recomputed from the noise.
- ``"mismatch"``: the source tokens of all modules whose tokens have the same width
  (``block_size * r``) are pooled and dealt out again by a seeded derangement in which no
  module receives any of its own tokens (when that is possible: no module may own more than
  half of the pool). Content and alignment are broken, the multiset of tokens is kept;
  descriptors move with their tokens.

Worked example (one bucket of ``M = 2`` modules, ``n_s = 3`` source tokens, ``F = 8``)::

    ctx = build_contexts(plan, target, sources)        # {group: [bucket {"src": (2, 3, 8), ...}]}
    noisy = apply_source_control(ctx, plan, "noise", seed=0)
    np.linalg.norm(noisy[g][0]["src"], axis=-1)        # == np.linalg.norm(ctx[g][0]["src"], -1)
    mixed = apply_source_control(ctx, plan, "mismatch", seed=0)
    # sorted rows of every src in the pool are those of ctx; module 0 now holds module 1's

:func:`rolled_sources` and :func:`swapped_sources` are the probe's extra perturbations
(:mod:`hfjax.fusion.probe`): layer i's sources given to layer i + 1 within a bucket, and the
experts' segments of each source context rotated. Everything here is numpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bridge.lora_adapter import LoraAdapter
from hfjax.config.components import SOURCE_CONTROLS, source_control_problems
from hfjax.fusion.blocks import svd_descriptor
from hfjax.fusion.plan import FusionError, FusionPlan

Contexts = Mapping[str, Sequence[Mapping[str, np.ndarray]]]

# Mixed into the seed so control draws never coincide with other users of ``cfg.seed``.
_NOISE_SALT = 0x6E6F6973
_MISMATCH_SALT = 0x6D69736D


class ControlError(FusionError):
    """A source control that cannot be applied; the message names the field or the input."""


def source_control_of(cfg: Any) -> str:
    """The source control a fuse config asks for: ``cfg.fusion.source_control``.

    ``cfg.fusion.zero_sources = True`` is an alias of ``"zero"`` (kept for old configs); it
    conflicts with any other control. Either field may be absent (``"none"`` / ``False``).
    """
    fusion = cfg.fusion
    control = getattr(fusion, "source_control", "none")
    zero = getattr(fusion, "zero_sources", False)
    problems = source_control_problems(control, zero)
    if problems:
        raise ControlError(f"config: {problems[0]}")
    return "zero" if zero else control


def apply_source_control(contexts: Contexts, plan: FusionPlan, control: str, *,
                         seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """``build_contexts``'s output with the sources replaced by ``control`` (a new dict).

    ``"none"`` returns a shallow copy; the inputs are never modified.
    """
    if control not in SOURCE_CONTROLS:
        raise ControlError(f"source control {control!r} must be one of "
                           f"{', '.join(SOURCE_CONTROLS)}")
    out = {g: [dict(c) for c in buckets] for g, buckets in contexts.items()}
    if control == "zero":
        for buckets in out.values():
            for c in buckets:
                c["src"] = np.zeros_like(c["src"])
                c["src_s"] = np.zeros_like(c["src_s"])
    elif control == "noise":
        _noise(out, plan, seed)
    elif control == "mismatch":
        _mismatch(out, plan, seed)
    return out


def _noise(ctx: dict[str, list[dict[str, np.ndarray]]], plan: FusionPlan, seed: int) -> None:
    for gi, g in enumerate(plan.groups):
        for bi, c in enumerate(ctx[g.name]):
            rng = np.random.default_rng([seed, _NOISE_SALT, gi, bi])
            src = np.asarray(c["src"])
            x = src.astype(np.float64)
            z = rng.standard_normal(x.shape) * (x != 0)
            norm_x = np.linalg.norm(x, axis=-1, keepdims=True)
            norm_z = np.linalg.norm(z, axis=-1, keepdims=True)
            z *= np.divide(norm_x, norm_z, out=np.zeros_like(norm_z), where=norm_z > 0)
            noisy = z.astype(src.dtype)
            c["src"] = noisy
            M, n_s, _ = noisy.shape
            c["src_s"] = svd_descriptor(noisy.reshape(M * n_s, -1), plan.block_size,
                                        g.rank).reshape(M, n_s, g.rank)


def module_derangement(owner: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """A permutation ``perm`` of the pool with ``owner[perm[s]] != owner[s]`` for every slot.

    Slot ``s`` receives item ``perm[s]``. Items are laid out owner by owner (owners and items
    in random order) and every item moves ``m`` places on, ``m`` the largest owner's count:
    that leaves every owner's run whenever ``2 m <= N``. Otherwise (one owner holds more than
    half) no such permutation exists; then every item still moves to another slot (``N >= 2``)
    and the flag is False.
    """
    owner = np.asarray(owner)
    n = owner.size
    owners, counts = np.unique(owner, return_counts=True)
    m = int(counts.max()) if n else 0
    by_owner = n > 0 and 2 * m <= n
    if by_owner:
        order = rng.permutation(owners)
        seq = np.concatenate([rng.permutation(np.flatnonzero(owner == o)) for o in order])
        shift = m
    else:
        seq, shift = rng.permutation(n), min(1, n)
    perm = np.empty(n, dtype=np.int64)
    perm[seq[(np.arange(n) + shift) % max(n, 1)]] = seq
    return perm, by_owner


def _mismatch(ctx: dict[str, list[dict[str, np.ndarray]]], plan: FusionPlan, seed: int) -> None:
    # Pools by token width; each entry (group, bucket) holds M x n_s tokens, module-owned.
    pools: dict[int, list[tuple[str, int]]] = {}
    for g in plan.groups:
        for bi in range(len(g.buckets)):
            pools.setdefault(plan.block_size * g.rank, []).append((g.name, bi))
    rng = np.random.default_rng([seed, _MISMATCH_SALT])
    for width, where in sorted(pools.items()):
        srcs = [np.asarray(ctx[g][bi]["src"]) for g, bi in where]
        descs = [np.asarray(ctx[g][bi]["src_s"]) for g, bi in where]
        tokens = np.concatenate([s.reshape(-1, width) for s in srcs])
        desc = np.concatenate([d.reshape(-1, d.shape[-1]) for d in descs])
        owner = np.concatenate([
            np.repeat(np.arange(s.shape[0]) + sum(p.shape[0] for p in srcs[:j]), s.shape[1])
            for j, s in enumerate(srcs)])
        perm, by_owner = module_derangement(owner, rng)
        if not by_owner:
            warnings.warn(f"source_control 'mismatch': one module holds more than half of the "
                          f"{tokens.shape[0]} source tokens of width {width}; some modules keep "
                          "some of their own tokens (in other positions)", stacklevel=3)
        tokens, desc = tokens[perm], desc[perm]
        pos = 0
        for (g, bi), s, d in zip(where, srcs, descs, strict=True):
            k = s.shape[0] * s.shape[1]
            ctx[g][bi]["src"] = tokens[pos:pos + k].reshape(s.shape)
            ctx[g][bi]["src_s"] = desc[pos:pos + k].reshape(d.shape)
            pos += k


def rolled_sources(contexts: Contexts, plan: FusionPlan) -> dict[str, list[dict[str, np.ndarray]]]:
    """Layer i's source tokens (and descriptors) given to layer i + 1, within each bucket.

    Modules of a bucket ascend by layer; the deepest one's sources go to the shallowest. A
    bucket of one module is unchanged (its neighbours have other token counts).
    """
    out = {g: [dict(c) for c in buckets] for g, buckets in contexts.items()}
    for g in plan.groups:
        for c in out[g.name]:
            c["src"] = np.roll(np.asarray(c["src"]), 1, axis=0)
            c["src_s"] = np.roll(np.asarray(c["src_s"]), 1, axis=0)
    return out


def source_segments(plan: FusionPlan, sources: Sequence[LoraAdapter]
                    ) -> dict[str, tuple[int, ...]]:
    """Per fused module: how many of its source tokens each of its sources contributes."""
    bs = plan.block_size
    out = {}
    for g in plan.groups:
        for m in g.modules:
            seg = []
            for k, name in m.sources:
                sm = sources[k].modules[name]
                seg.append(-(-sm.d_in // bs) + -(-sm.d_out // bs))
            if sum(seg) != m.n_src_tokens:
                raise ControlError(f"{m.name}: the source adapters do not match the plan")
            out[m.name] = tuple(seg)
    return out


def swapped_sources(contexts: Contexts, plan: FusionPlan,
                    segments: Mapping[str, Sequence[int]]
                    ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each module's expert segments rotated: ``(s_1, s_2, ..., s_m) -> (s_2, ..., s_m, s_1)``.

    The tokens of each expert then sit where another expert's were (for two experts, a swap).
    ``segments`` is :func:`source_segments`'s output. Modules with one source are unchanged.
    """
    out = {g: [dict(c) for c in buckets] for g, buckets in contexts.items()}
    for g in plan.groups:
        for b, c in zip(g.buckets, out[g.name], strict=True):
            src, src_s = np.array(c["src"]), np.array(c["src_s"])
            for i, m in enumerate(b.modules):
                first = int(segments[m.name][0])
                if len(segments[m.name]) >= 2:
                    src[i] = np.roll(src[i], -first, axis=0)
                    src_s[i] = np.roll(src_s[i], -first, axis=0)
            c["src"], c["src_s"] = src, src_s
    return out
