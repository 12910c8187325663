"""Block contexts: the tokens a transfer network reads (docs/algorithm.md §3).

A LoRA factor seen as ``rows x r`` (``A^T`` is ``d_in x r``, ``B`` is ``d_out x r``) is cut
into ``block_size``-row blocks (the last one zero-padded); each block, flattened row-major,
is one token of ``block_size * r`` values. Each token also carries an ``r``-value descriptor:
the singular values of its raw ``block_size x r`` block.

Worked example (``block_size = 4``, ``r = 2``)::

    B = [[1, 2],            to_blocks(B, 4) = [[1, 2, 3, 4, 5, 6, 7, 8],
         [3, 4],                               [9, 10, 0, 0, 0, 0, 0, 0]]   # (2, 8)
         [5, 6],
         [7, 8],
         [9, 10]]   # (5, 2)

For one module with ``d_in = 6``, ``d_out = 5`` and two matching sources, the contexts are::

    tgt   = concat(blocks(A_t^T), blocks(B_t))              # (n_a + n_b, bs*r) = (2 + 2, 8)
    src   = concat(blocks(A_1^T), blocks(B_1),
                   blocks(A_2^T), blocks(B_2))              # (n_s, 8): sources concatenated
    tgt_s, src_s = svd descriptors                          # (4, 2), (n_s, 2)

:func:`build_contexts` stacks the modules of each plan bucket into a leading batch axis.
Everything here is numpy, computed once before training from the original tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bridge.lora_adapter import LoraAdapter
from hfjax.fusion.plan import FusionError, FusionPlan, ModuleEntry


def to_blocks(T: np.ndarray, block_size: int) -> np.ndarray:
    """``(rows, r)`` -> ``(ceil(rows / block_size), block_size * r)``: zero-pad, row-major.

    The dtype of ``T`` is kept.
    """
    T = np.asarray(T)
    if T.ndim != 2:
        raise FusionError(f"to_blocks expects a (rows, r) matrix, got shape {T.shape}")
    rows, r = T.shape
    n = -(-rows // block_size)
    padded = np.zeros((n * block_size, r), dtype=T.dtype)
    padded[:rows] = T
    return padded.reshape(n, block_size * r)


def svd_descriptor(blocks: np.ndarray, block_size: int, rank: int) -> np.ndarray:
    """Singular values of each raw ``block_size x rank`` block: ``(n, bs*r)`` -> ``(n, r)``.

    Computed in float64 and rounded to float32, descending, unnormalised (docs/algorithm.md §3).
    Blocks whose singular values are fewer than ``rank`` (``block_size < rank``) are zero-filled.
    """
    b = np.asarray(blocks, dtype=np.float64).reshape(-1, block_size, rank)
    s = np.linalg.svd(b, compute_uv=False)  # (n, min(bs, r)), descending
    out = np.zeros((b.shape[0], rank), dtype=np.float64)
    out[:, : s.shape[1]] = s
    return out.astype(np.float32)


def _factor_tokens(A: np.ndarray, B: np.ndarray, block_size: int) -> np.ndarray:
    """``concat(blocks(A^T), blocks(B))`` in float32."""
    a_t = np.asarray(A, dtype=np.float32).T
    b = np.asarray(B, dtype=np.float32)
    return np.concatenate([to_blocks(a_t, block_size), to_blocks(b, block_size)], axis=0)


def module_context(
    entry: ModuleEntry, target: LoraAdapter, sources: Sequence[LoraAdapter], block_size: int
) -> dict[str, np.ndarray]:
    """One module's unbatched context: ``tgt (n_t, bs*r)``, ``tgt_s (n_t, r)``, ``src``,
    ``src_s``."""
    tm = target.modules[entry.name]
    tgt = _factor_tokens(tm.A, tm.B, block_size)
    src = np.concatenate(
        [_factor_tokens(sources[k].modules[n].A, sources[k].modules[n].B, block_size)
         for k, n in entry.sources], axis=0)
    if tgt.shape[0] != entry.n_a + entry.n_b or src.shape[0] != entry.n_src_tokens:
        raise FusionError(f"{entry.name}: adapters do not match the plan they were planned with")
    return {
        "tgt": tgt,
        "tgt_s": svd_descriptor(tgt, block_size, entry.rank),
        "src": src,
        "src_s": svd_descriptor(src, block_size, entry.rank),
    }


def build_contexts(
    plan: FusionPlan, target: LoraAdapter, sources: Sequence[LoraAdapter]
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Stacked contexts per group and bucket (float32 numpy).

    Returns ``{group name: [per bucket {"tgt": (M, n_t, bs*r), "tgt_s": (M, n_t, r),
    "src": (M, n_s, bs*r), "src_s": (M, n_s, r)}]}`` with ``M`` the bucket's modules, in
    ``bucket.modules`` order.
    """
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for g in plan.groups:
        per_bucket = []
        for b in g.buckets:
            ctxs = [module_context(m, target, sources, plan.block_size) for m in b.modules]
            per_bucket.append({k: np.stack([c[k] for c in ctxs]) for k in ctxs[0]})
        out[g.name] = per_bucket
    return out
