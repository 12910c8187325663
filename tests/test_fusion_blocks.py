"""Block contexts (docs/algorithm.md §3): padding, row-major tokens, SVD descriptors, bucket
stacking."""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

from bridge.lora_adapter import LoraAdapter
from hfjax.fusion import build_contexts, build_plan, svd_descriptor, to_blocks
from hfjax.testing.adapters import random_adapter


def test_to_blocks_pads_and_flattens_row_major():
    B = np.arange(1, 11, dtype=np.float32).reshape(5, 2)
    out = to_blocks(B, 4)
    np.testing.assert_array_equal(out, [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0, 0, 0]])
    assert out.dtype == np.float32


def test_to_blocks_exact_multiple_has_no_padding_block():
    T = np.random.default_rng(0).standard_normal((8, 3))
    out = to_blocks(T, 4)
    assert out.shape == (2, 12)
    np.testing.assert_array_equal(out.reshape(2, 4, 3), T.reshape(2, 4, 3))


def test_svd_descriptor_matches_numpy():
    rng = np.random.default_rng(0)
    T = rng.standard_normal((11, 3)).astype(np.float32)
    blocks = to_blocks(T, 4)
    s = svd_descriptor(blocks, 4, 3)
    assert s.shape == (3, 3) and s.dtype == np.float32
    for i in range(3):
        want = np.linalg.svd(blocks[i].reshape(4, 3), compute_uv=False)
        np.testing.assert_allclose(s[i], want, rtol=1e-6)
        assert np.all(np.diff(s[i]) <= 0)
    # The last block holds 3 real rows and a zero row: its descriptor is the raw block's.
    padded = np.zeros((4, 3))
    padded[:3] = T[8:]
    np.testing.assert_allclose(s[2], np.linalg.svd(padded, compute_uv=False), rtol=1e-6)


def test_svd_descriptor_short_blocks_zero_fill():
    s = svd_descriptor(np.ones((1, 2 * 4)), 2, 4)  # block 2 x 4 has 2 singular values
    assert s.shape == (1, 4)
    np.testing.assert_allclose(s[0, 2:], 0.0)


def test_build_contexts_stacks_buckets_in_plan_order():
    t = random_adapter(6, 10, 14, 2, modules=("q_proj", "down_proj"), seed=0)
    a = random_adapter(4, 6, 9, 2, modules=("q_proj", "down_proj"), seed=1)
    b = random_adapter(6, 12, 7, 2, modules=("q_proj",), seed=2)
    plan = build_plan(t, [a, b], block_size=4)
    ctx = build_contexts(plan, t, [a, b])
    assert list(ctx) == [g.name for g in plan.groups]
    for g in plan.groups:
        assert len(ctx[g.name]) == len(g.buckets)
        for bucket, c in zip(g.buckets, ctx[g.name], strict=True):
            M = len(bucket.modules)
            assert c["tgt"].shape == (M, bucket.n_t, 8) and c["tgt_s"].shape == (M, bucket.n_t, 2)
            assert c["src"].shape == (M, bucket.n_s, 8) and c["src_s"].shape == (M, bucket.n_s, 2)
            assert all(v.dtype == np.float32 for v in c.values())
            for i, m in enumerate(bucket.modules):
                tm = t.modules[m.name]
                want_t = np.concatenate([to_blocks(tm.A.T, 4), to_blocks(tm.B, 4)])
                np.testing.assert_array_equal(c["tgt"][i], want_t)
                srcs = [a, b]
                want_s = np.concatenate([
                    np.concatenate([to_blocks(srcs[k].modules[n].A.T, 4),
                                    to_blocks(srcs[k].modules[n].B, 4)])
                    for k, n in m.sources])
                np.testing.assert_array_equal(c["src"][i], want_s)
                np.testing.assert_allclose(c["src_s"][i], svd_descriptor(want_s, 4, 2))
    # q_proj at layers 0, 1 only gets source b: a separate bucket from layers 2..5.
    assert len(plan.group("q_proj_r2").buckets) == 2


def test_build_contexts_reads_bf16_adapters():
    t = random_adapter(2, 8, 8, 2, seed=0)
    s = random_adapter(2, 8, 8, 2, seed=1)
    t16 = LoraAdapter(config=t.config, modules={
        k: dataclasses.replace(m, A=m.A.astype(ml_dtypes.bfloat16),
                               B=m.B.astype(ml_dtypes.bfloat16))
        for k, m in t.modules.items()})
    plan = build_plan(t16, [s], block_size=4)
    c = build_contexts(plan, t16, [s])["q_proj_r2"][0]
    assert c["tgt"].dtype == np.float32
    m = t16.modules[plan.groups[0].modules[0].name]
    np.testing.assert_array_equal(c["tgt"][0, 2:].reshape(-1, 2)[:8], m.B.astype(np.float32))


def test_build_contexts_refuses_adapters_other_than_planned():
    t = random_adapter(2, 8, 8, 2, seed=0)
    s = random_adapter(2, 8, 8, 2, seed=1)
    plan = build_plan(t, [s], block_size=4)
    wider = random_adapter(2, 16, 8, 2, seed=1)
    with pytest.raises(ValueError, match="do not match the plan"):
        build_contexts(plan, t, [wider])
