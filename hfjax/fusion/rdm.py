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

import dataclasses
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hfjax.config.components import RDM_SORTS as _SORTS  # the one table of sort modes
from hfjax.fusion.plan import MERGE_PAD_LIMIT, FusionError, greedy_merge

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
                   sort: str = "auto", valid: Array | None = None) -> Array:
    """The RDM value for given draws: ``z (..., E)`` raw embeddings, ``y (N, E)`` the already
    rectified target sample, ``P (E, K)`` unit-norm directions. (Exposed for parity tests.)

    ``valid (N,)`` (optional) marks the real rows of a padded ``z`` and ``y``: the padded
    projections of both are set above every real value, so they sort last and match each
    other, and the mean runs over the real rows only: the unpadded value, exactly."""
    zr = _activate(jnp.asarray(z, jnp.float32).reshape(-1, z.shape[-1]), activation)
    P = jnp.asarray(P, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    n, K = zr.shape[0], P.shape[-1]
    count = n * K if valid is None else jnp.sum(valid) * K

    def pad(x: Array, axis: int) -> Array:  # padded rows -> +max (axis: the rows' axis of x)
        if valid is None:
            return x
        v = valid[:, None] if axis == 0 else valid[None, :]
        return jnp.where(v, x, jnp.finfo(jnp.float32).max)

    if _resolve_sort(sort) == "xla":
        zp = pad(zr @ P, 0)
        yp = jax.lax.stop_gradient(pad(y @ P, 0))
        return jnp.sum((jnp.sort(zp, axis=0) - jnp.sort(yp, axis=0)) ** 2) / count
    # Host path: the projections come out as (K, N) so that numpy sorts contiguous rows;
    # batched calls (vmap over draws) hand numpy one (..., K, N) array.
    zp = pad(jnp.einsum("ek,ne->kn", P, zr), 1)
    yp = jax.lax.stop_gradient(pad(jnp.einsum("ek,ne->kn", P, y), 1))
    m = jax.pure_callback(
        _rank_match_rows, jax.ShapeDtypeStruct(zp.shape, jnp.float32),
        jax.lax.stop_gradient(zp), yp, vmap_method="expand_dims")
    return jnp.sum((zp - jax.lax.stop_gradient(m)) ** 2) / count


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
    """Directions ``(..., E, K)`` of unit norm (torch's ``F.normalize`` over the E axis)."""
    return P / jnp.maximum(jnp.linalg.norm(P, axis=-2, keepdims=True), 1e-12)


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


@dataclasses.dataclass(frozen=True)
class RdmRow:
    """One ``L(z_t) + L(z_s)`` pair of ``avg_rdm`` (static: names and token counts).

    ``module is None``: the group's one bucket, its modules pooled (``n_t``, ``n_s`` are the
    pooled row counts); otherwise module ``module`` of bucket ``bucket``. ``weight``: the pair's
    share of ``avg_rdm`` (``1/G``, or ``1/(G · modules of the group)``)."""

    group: str
    bucket: int
    module: int | None
    n_t: int
    n_s: int
    weight: float


def rdm_rows(shapes: Mapping[str, Sequence[tuple[int, int, int]]]) -> list[RdmRow]:
    """The pairs of ``avg_rdm`` for ``{group: [(modules, n_t, n_s) per bucket]}``, groups in
    sorted order (docs/algorithm.md §6)."""
    if not shapes:
        raise FusionError("average_rdm needs at least one group")
    G, rows = len(shapes), []
    for g in sorted(shapes):
        buckets = shapes[g]
        if len(buckets) == 1:
            m, n_t, n_s = buckets[0]
            rows.append(RdmRow(g, 0, None, m * n_t, m * n_s, 1.0 / G))
            continue
        n_modules = sum(m for m, _, _ in buckets)
        rows += [RdmRow(g, b, i, n_t, n_s, 1.0 / (G * n_modules))
                 for b, (m, n_t, n_s) in enumerate(buckets) for i in range(m)]
    return rows


def rdm_calls(rows: Sequence[RdmRow]) -> list[tuple[int, ...]]:
    """How the pairs run: tuples of row indices, each ONE vmapped call whose rows are padded to
    the call's largest ``n_t`` and ``n_s`` (masked: exact), as long as the padding adds at most
    ``MERGE_PAD_LIMIT`` times the real rows. Fewer calls compile faster (docs/performance.md
    §6); at the paper's shape each group's pooled pair is large and the sizes differ, so the
    limit keeps the sorts' extra work bounded."""
    def fits(call: list[int]) -> bool:
        real = sum(rows[j].n_t + rows[j].n_s for j in call)
        padded = len(call) * (max(rows[j].n_t for j in call) + max(rows[j].n_s for j in call))
        return padded <= MERGE_PAD_LIMIT * real

    order = sorted(range(len(rows)), key=lambda i: (rows[i].n_t + rows[i].n_s, rows[i].n_t, i))
    return greedy_merge(order, fits)


def _call_shape(rows: Sequence[RdmRow], call: Sequence[int]) -> tuple[int, int, int]:
    return (len(call), max(rows[j].n_t for j in call), max(rows[j].n_s for j in call))


def call_draws(key: Array, rows: Sequence[RdmRow], calls: Sequence[Sequence[int]], dim: int, *,
               mu_target: float = 0.0, sigma_target: float = 1.0, num_projections: int = 2048,
               activation: str = "relu") -> list[tuple[Array, Array, Array, Array]]:
    """Every call's ``(y_t (R, n_t, E), P_t (R, E, K), y_s (R, n_s, E), P_s (R, E, K))``: the
    rectified target samples and unit-norm directions of its ``R`` pairs, padded rows included,
    cut from ONE standard normal draw of ``key`` for the whole ``avg_rdm`` (one random-number
    kernel per micro-batch; every pair gets its own numbers)."""
    K, E = num_projections, dim
    sizes = []
    for c in calls:
        R, n_t, n_s = _call_shape(rows, c)
        sizes += [R * n_t * E, R * E * K, R * n_s * E, R * E * K]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
    out = []
    for k, c in enumerate(calls):
        R, n_t, n_s = _call_shape(rows, c)
        a, b, cc, d = parts[4 * k: 4 * k + 4]
        out.append((_target_sample(a.reshape(R, n_t, E), mu_target, sigma_target, activation),
                    _unit_columns(b.reshape(R, E, K)),
                    _target_sample(cc.reshape(R, n_s, E), mu_target, sigma_target, activation),
                    _unit_columns(d.reshape(R, E, K))))
    return out


def row_draws(key: Array, shapes: Mapping[str, Sequence[tuple[int, int, int]]], dim: int,
              **draw_kwargs: Any) -> dict[tuple[str, int, int | None],
                                          tuple[tuple[Array, Array], tuple[Array, Array]]]:
    """``{(group, bucket, module): ((y_t, P_t), (y_s, P_s))}``: the draws `average_rdm` uses for
    each pair (real rows only; `RdmRow` says what the key means). For replicas and tests."""
    rows = rdm_rows(shapes)
    calls = rdm_calls(rows)
    out = {}
    for c, (yt, pt, ys, ps) in zip(calls, call_draws(key, rows, calls, dim, **draw_kwargs),
                                   strict=True):
        for r, j in enumerate(c):
            row = rows[j]
            out[(row.group, row.bucket, row.module)] = ((yt[r, : row.n_t], pt[r]),
                                                        (ys[r, : row.n_s], ps[r]))
    return out


def _padded_rows(blocks: Sequence[Array], n: int) -> Array:
    """``(rows, n_i, E)`` blocks as one ``(R, n, E)`` array, zero-padded along tokens."""
    return jnp.concatenate([jnp.pad(b, ((0, 0), (0, n - b.shape[1]), (0, 0))) for b in blocks])


def average_rdm(aux: Mapping[str, Sequence[Mapping[str, Array]]], key: Array, *,
                mu_target: float = 0.0, sigma_target: float = 1.0,
                num_projections: int = 2048, activation: str = "relu",
                sort: str = "auto") -> Array:
    """``avg_rdm = mean over groups of rdm_g`` (docs/algorithm.md §6) for
    ``aux = {group: [{"z_t": (M, n_t, E), "z_s": (M, n_s, E)} per bucket]}``.

    ``rdm_g``: a one-bucket group pools ``z`` over its modules into one ``L(z_t) + L(z_s)``; a
    group of several buckets is the mean over its modules of their own pairs (`rdm_rows`).
    The pairs run as few vmapped calls (`rdm_calls`: padded, masked out of the sorts, exact)
    with draws cut from one normal sample of ``key`` (`call_draws`). Fold the step and the
    micro-batch into ``key`` so that every call draws afresh. The result does not depend on
    the order of ``aux``'s keys (a jitted function returns dicts with sorted keys).
    """
    shapes = {g: [(int(a["z_t"].shape[0]), int(a["z_t"].shape[1]), int(a["z_s"].shape[1]))
                  for a in bs] for g, bs in aux.items()}
    rows = rdm_rows(shapes)
    calls = rdm_calls(rows)
    dim = int(next(iter(aux.values()))[0]["z_t"].shape[-1])
    draws = call_draws(key, rows, calls, dim, mu_target=mu_target, sigma_target=sigma_target,
                       num_projections=num_projections, activation=activation)

    def tokens(row: RdmRow, side: str) -> Array:
        z = aux[row.group][row.bucket][side]
        if row.module is None:  # pooled: one row of all the group's tokens
            return z.reshape(1, -1, z.shape[-1])
        return z[row.module: row.module + 1]

    def value(zt, zs, yt, pt, ys, ps, vt, vs):
        return (rdm_from_draws(zt, yt, pt, activation=activation, sort=sort, valid=vt)
                + rdm_from_draws(zs, ys, ps, activation=activation, sort=sort, valid=vs))

    total = jnp.zeros((), jnp.float32)
    for c, (yt, pt, ys, ps) in zip(calls, draws, strict=True):
        _, n_t, n_s = _call_shape(rows, c)
        zt = _padded_rows([tokens(rows[j], "z_t") for j in c], n_t)
        zs = _padded_rows([tokens(rows[j], "z_s") for j in c], n_s)
        vt = np.arange(n_t)[None] < np.asarray([rows[j].n_t for j in c])[:, None]
        vs = np.arange(n_s)[None] < np.asarray([rows[j].n_s for j in c])[:, None]
        vals = jax.vmap(value)(zt, zs, yt, pt, ys, ps, jnp.asarray(vt), jnp.asarray(vs))
        total = total + jnp.dot(jnp.asarray([rows[j].weight for j in c], jnp.float32), vals)
    return total
