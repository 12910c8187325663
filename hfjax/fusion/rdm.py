"""RDM regulariser: a sliced-Wasserstein pull of the encoder embeddings toward a rectified
Gaussian (docs/algorithm.md §6).

For ``z`` of shape ``(..., E)`` (``z_t`` or ``z_s`` of one bucket, before positions)::

    zr = relu(z.reshape(-1, E))                          # (N, E)
    y  = relu(normal((N, E)) * sigma_target + mu_target) # fresh sample every call
    P  = normal((E, K)); P /= column norms               # K = num_projections directions
    L  = mean((sort(zr @ P, axis=0) - sort(y @ P, axis=0)) ** 2)    # scalar

Example: ``z_t`` of a bucket of 28 modules x 2 tokens with E = 1024 and K = 2048 gives
``zr @ P`` of shape ``(56, 2048)``, sorted column by column.

**Host rank matching** (``sort="host"``, docs/performance.md trick 1). XLA's CPU sort is slow, so on
CPU the sorted target is computed outside XLA: per column, sort ``y @ P`` and place its
values at the (stable) ranks of ``zr @ P``, giving ``m`` with
``sum((sort(zP) - sort(yP))**2) == sum((zP - m)**2)``. Then ``mean((zP - stop_gradient(m))**2)``
has the same value and the same gradient as the sort form (a sort's derivative is just its
permutation; both paths break ties stably). ``sort="auto"`` picks ``host`` on the CPU backend
and the plain ``xla`` sort elsewhere. The host side works on ``(K, N)`` projections (one
contiguous row per direction) and does the stable argsort as one SIMD sort of packed
(value, position) uint64 keys (measured: docs/performance.md §4.3).

**Activation** [code≠paper]: the code uses ReLU (default); ``activation="prelu"`` applies the
paper's PReLU at torch's initial slope 0.25 (not learned) to both ``z`` and ``y``.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.config.components import RDM_SORTS as _SORTS  # the one table of sort modes
from hfjax.fusion.plan import FusionError

Array = jax.Array
PRELU_SLOPE = 0.25  # torch.nn.PReLU's initial slope


def _activate(x: Array, activation: str) -> Array:
    if activation == "relu":
        return jax.nn.relu(x)
    if activation == "prelu":
        return jnp.where(x >= 0, x, PRELU_SLOPE * x)
    raise FusionError(f"activation must be 'relu' or 'prelu', got {activation!r}")


def _sortable_keys(x: np.ndarray) -> np.ndarray:
    """float32 ``x (..., n)`` -> uint64 keys whose order along the last axis is the stable
    order of ``x``: the float's bits made monotonic (high word) and the position (low word).
    ``-0.0`` is folded into ``0.0`` first so that it ties with it, as in a float sort."""
    n = x.shape[-1]
    u = (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)
    # negative floats: flip all bits; non-negative: set the sign bit -> unsigned order
    u = u ^ ((-(u >> 31).astype(np.int32)).astype(np.uint32) | np.uint32(0x80000000))
    return (u.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)


def _rank_match_rows(zp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Per row (last axis): sorted ``yp`` placed at the stable ranks of ``zp``.

    Arrays are ``(..., K, N)``: one projection per row, so every sort runs along contiguous
    memory. A stable argsort is done as one plain sort of packed (value, position) keys,
    which numpy runs with its SIMD sort (docs/performance.md §4.3)."""
    keys = _sortable_keys(zp)
    keys.sort(axis=-1)
    low = keys.view(np.uint32)[..., 0 if sys.byteorder == "little" else 1 :: 2]  # positions
    order = low.astype(np.intp)  # (a strided view: much faster than `keys & 0xFFFFFFFF`)
    ys = np.sort(np.asarray(yp, np.float32), axis=-1)
    m = np.empty_like(ys)
    np.put_along_axis(m, order, ys, axis=-1)  # m[..., order[..., i]] = ys[..., i]
    return m


def _rank_match_host(zp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """Per column of ``(N, K)`` arrays: sorted ``yp`` placed at the stable ranks of ``zp``."""
    return _rank_match_rows(np.ascontiguousarray(np.asarray(zp, np.float32).T),
                            np.ascontiguousarray(np.asarray(yp, np.float32).T)).T


def _resolve_sort(sort: str) -> str:
    if sort not in _SORTS:
        raise FusionError(f"sort must be one of {_SORTS}, got {sort!r}")
    if sort == "auto":
        return "host" if jax.default_backend() == "cpu" else "xla"
    return sort


def rdm_from_draws(z: Array, y: Array, P: Array, *, activation: str = "relu",
                   sort: str = "auto") -> Array:
    """The RDM value for given draws: ``z (..., E)`` raw embeddings, ``y (N, E)`` the already
    rectified target sample, ``P (E, K)`` unit-norm directions. (Exposed for parity tests.)"""
    zr = _activate(jnp.asarray(z, jnp.float32).reshape(-1, z.shape[-1]), activation)
    P = jnp.asarray(P, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if _resolve_sort(sort) == "xla":
        zp = zr @ P
        yp = jax.lax.stop_gradient(y @ P)
        return jnp.mean((jnp.sort(zp, axis=0) - jnp.sort(yp, axis=0)) ** 2)
    # Host path: the projections come out as (K, N) so that numpy sorts contiguous rows;
    # batched calls (vmap over draws) hand numpy one (..., K, N) array.
    zp = jnp.einsum("ek,ne->kn", P, zr)
    yp = jax.lax.stop_gradient(jnp.einsum("ek,ne->kn", P, y))
    m = jax.pure_callback(
        _rank_match_rows, jax.ShapeDtypeStruct(zp.shape, jnp.float32),
        jax.lax.stop_gradient(zp), yp, vmap_method="expand_dims")
    return jnp.mean((zp - jax.lax.stop_gradient(m)) ** 2)


def rdm_draws(key: Array, n: int, dim: int, *, mu_target: float = 0.0,
              sigma_target: float = 1.0, num_projections: int = 2048,
              activation: str = "relu") -> tuple[Array, Array]:
    """The random part of one RDM call: ``y (n, dim)`` rectified sample, ``P (dim, K)``."""
    k_y, k_p = jax.random.split(key)
    y = _target_sample(jax.random.normal(k_y, (n, dim), jnp.float32), mu_target, sigma_target,
                       activation)
    return y, _unit_columns(jax.random.normal(k_p, (dim, num_projections), jnp.float32))


def _target_sample(x: Array, mu_target: float, sigma_target: float, activation: str) -> Array:
    """Standard normals -> the rectified Gaussian target sample."""
    return _activate(x * sigma_target + mu_target, activation)


def _unit_columns(P: Array) -> Array:
    """Directions of unit norm (torch's ``F.normalize`` over the rows' axis)."""
    return P / jnp.maximum(jnp.linalg.norm(P, axis=0, keepdims=True), 1e-12)


def rdm_loss(
    z: Array,
    key: Array,
    *,
    mu_target: float = 0.0,
    sigma_target: float = 1.0,
    num_projections: int = 2048,
    activation: str = "relu",
    sort: str = "auto",
) -> Array:
    """docs/algorithm.md §6's ``L(z)`` for one embedding tensor ``z (..., E)``; a float32 scalar.

    ``key`` drives both the target sample and the projections (split into two).
    """
    n = int(np.prod(z.shape[:-1]))
    y, P = rdm_draws(key, n, z.shape[-1], mu_target=mu_target, sigma_target=sigma_target,
                     num_projections=num_projections, activation=activation)
    return rdm_from_draws(z, y, P, activation=activation, sort=sort)


def _group_id(group: str) -> int:
    return zlib.crc32(group.encode()) & 0x7FFFFFFF


def group_key(key: Array, group: str) -> Array:
    """A group's key: ``fold_in(key, crc32(group name))``: independent of the other groups."""
    return jax.random.fold_in(key, _group_id(group))


def group_keys(key: Array, groups: Sequence[str]) -> Array:
    """`group_key` of each of ``groups``, stacked (one vmapped call)."""
    ids = jnp.asarray([_group_id(g) for g in groups], jnp.uint32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, ids)


def pair_draws(key: Array, n_t: int, n_s: int, dim: int, *, mu_target: float = 0.0,
               sigma_target: float = 1.0, num_projections: int = 2048,
               activation: str = "relu") -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """``((y_t, P_t), (y_s, P_s))`` for one ``L(z_t) + L(z_s)`` pair, as `rdm_draws` makes them
    (rectified sample, unit-norm directions) but from ONE normal draw of ``key`` cut in four:
    one random-number kernel per pair instead of six (docs/performance.md §6)."""
    K = num_projections
    sizes = (n_t * dim, dim * K, n_s * dim, dim * K)
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    cuts = np.cumsum(sizes)[:-1].tolist()
    a, b, c, d = jnp.split(flat, cuts)

    def y(x: Array, n: int) -> Array:
        return _target_sample(x.reshape(n, dim), mu_target, sigma_target, activation)

    return ((y(a, n_t), _unit_columns(b.reshape(dim, K))),
            (y(c, n_s), _unit_columns(d.reshape(dim, K))))


def pair_rdm(zt: Array, zs: Array, key: Array, *, activation: str = "relu",
             sort: str = "auto", **draw_kwargs: Any) -> Array:
    """``L(z_t) + L(z_s)`` with `pair_draws`' draws (``z (..., E)``, pooled over ``...``)."""
    n_t, n_s = int(np.prod(zt.shape[:-1])), int(np.prod(zs.shape[:-1]))
    (y_t, P_t), (y_s, P_s) = pair_draws(key, n_t, n_s, zt.shape[-1], activation=activation,
                                        **draw_kwargs)
    return (rdm_from_draws(zt, y_t, P_t, activation=activation, sort=sort)
            + rdm_from_draws(zs, y_s, P_s, activation=activation, sort=sort))


def group_rdm(buckets: Sequence[Mapping[str, Array]], key: Array, **rdm_kwargs: Any) -> Array:
    """One group's ``rdm_g``, as the first release computes it (docs/algorithm.md §6).

    One bucket (every module has the same token counts: the original stacks the group into
    one batch): ``L(z_t) + L(z_s)`` with ``z`` pooled over all the group's modules, drawn by
    `pair_draws` from ``fold_in(key, 0)``. Several buckets (the original runs module by
    module): the mean over the group's modules ``m`` of ``L(z_t,m) + L(z_s,m)``, vmapped over
    each bucket's modules; module ``i`` of bucket ``b`` draws from
    ``fold_in(fold_in(key, b), i)``.
    """
    if len(buckets) == 1:
        return pair_rdm(buckets[0]["z_t"], buckets[0]["z_s"], jax.random.fold_in(key, 0),
                        **rdm_kwargs)
    total = jnp.zeros((), jnp.float32)
    n_modules = 0
    for b, a in enumerate(buckets):
        m = a["z_t"].shape[0]
        kb = jax.random.fold_in(key, b)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(kb, jnp.arange(m))
        vals = jax.vmap(lambda zt, zs, k: pair_rdm(zt, zs, k, **rdm_kwargs))(
            a["z_t"], a["z_s"], keys)
        total = total + jnp.sum(vals)
        n_modules += m
    return total / n_modules


def average_rdm(aux: Mapping[str, Sequence[Mapping[str, Array]]], key: Array,
                **rdm_kwargs: Any) -> Array:
    """``avg_rdm = mean over groups of rdm_g`` (``rdm_g``: see `group_rdm`).

    Group ``g`` uses ``group_key(key, g)``. The result does not depend on the order of
    ``aux``'s keys (a jitted function returns dicts with sorted keys). Fold the step (and
    micro-batch) into ``key`` before calling, so that every call draws afresh.
    """
    if not aux:
        raise FusionError("average_rdm needs at least one group")
    names = sorted(aux)

    def group_value(buckets: Sequence[Mapping[str, Array]], kg: Array) -> Array:
        return group_rdm(buckets, kg, **rdm_kwargs)

    # Groups whose z's have the same shapes are evaluated as one vmapped call (same keys,
    # same values as one call per group).
    clusters: dict[tuple, list[str]] = {}
    for name in names:
        sig = tuple((a["z_t"].shape, a["z_s"].shape) for a in aux[name])
        clusters.setdefault(sig, []).append(name)
    value: dict[str, Array] = {}
    for members in clusters.values():
        keys = group_keys(key, members)
        if len(members) == 1:
            value[members[0]] = group_value(
                [{"z_t": a["z_t"], "z_s": a["z_s"]} for a in aux[members[0]]], keys[0])
            continue
        stacked = [{k: jnp.stack([aux[n][b][k] for n in members]) for k in ("z_t", "z_s")}
                   for b in range(len(aux[members[0]]))]
        vals = jax.vmap(group_value)(stacked, keys)
        for i, n in enumerate(members):
            value[n] = vals[i]
    return sum(value[n] for n in names) / len(names)
