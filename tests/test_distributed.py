"""Multi-host building blocks that run in one process: sliced checkpoint reads (what each
host reads of its shards) and the single-process behaviour of `hfjax.distributed`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from bridge.checkpoint import SafetensorsFile, open_checkpoint
from hfjax import distributed as dist


@pytest.fixture
def tensors(tmp_path):
    rng = np.random.default_rng(0)
    data = {"w": rng.standard_normal((6, 10, 4)).astype(np.float32),
            "v": np.arange(13, dtype=np.int64),
            "s": np.array(2.5, np.float32)}
    save_file(data, str(tmp_path / "model.safetensors"))
    return tmp_path, data


@pytest.mark.parametrize("index", [
    (slice(2, 5),), (slice(None), slice(3, 7)), (slice(1, 3), slice(0, 10), slice(1, 3)),
    (slice(0, 6), slice(0, 10), slice(0, 4)), (slice(5, 5),), (slice(4, 9),)])
def test_read_slice_reads_exactly_the_slice(tensors, index):
    root, data = tensors
    with SafetensorsFile(root / "model.safetensors") as f:
        got = f.read_slice("w", index)
        np.testing.assert_array_equal(got, data["w"][index])
        assert f.bytes_read == data["w"][index].nbytes  # no byte beyond the slice


def test_reader_get_slice_and_bytes_read(tensors):
    root, data = tensors
    (root / "config.json").write_text("{}")
    with open_checkpoint(root) as r:
        np.testing.assert_array_equal(r.get_slice("v", (slice(3, 8),)), data["v"][3:8])
        assert r.get_slice("s", ()) == 2.5
        assert r.bytes_read == 5 * 8 + 4
        r.get("w")
        assert r.bytes_read == 5 * 8 + 4 + data["w"].nbytes


def test_distributed_helpers_in_one_process():
    assert dist.is_primary() and not dist.is_multiprocess()
    tree = {"a": jnp.arange(4.0), "b": [np.ones(2), 3.0]}
    out = dist.gather_to_host(tree)
    assert isinstance(out["a"], np.ndarray) and isinstance(out["b"][0], np.ndarray)
    np.testing.assert_array_equal(out["a"], np.arange(4.0))
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    dist.barrier("noop")  # returns at once
