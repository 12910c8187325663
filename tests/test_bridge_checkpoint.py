"""bridge.open_checkpoint / save_checkpoint against transformers' own files and loader."""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import bridge.checkpoint
from bridge import CheckpointError, open_checkpoint, save_checkpoint

BF16 = np.dtype(ml_dtypes.bfloat16)
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def _tiny_llama(dtype: Any = None) -> Any:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    return model.to(dtype) if dtype is not None else model


def _to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(BF16) if t.dtype == torch.bfloat16 else t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _tensors(n: int = 3, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((16, 8)).astype(dtype)
            for i in range(n)}


# ------------------------------------------------------------------------------------------
# Reading transformers' checkpoints, writing checkpoints transformers loads
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_reads_transformers_checkpoint(tmp_path: Path, dtype_name: str) -> None:
    torch = pytest.importorskip("torch")
    model = _tiny_llama(getattr(torch, dtype_name))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    state = model.state_dict()
    with open_checkpoint(tmp_path / "hf") as ckpt:
        assert ckpt.path == tmp_path / "hf"
        assert ckpt.config == json.loads((tmp_path / "hf" / "config.json").read_text())
        assert ckpt.config["hidden_size"] == 32
        assert sorted(ckpt.keys()) == sorted(state) and len(ckpt) == len(state)
        for key, value in state.items():
            expected = _to_numpy(value)
            assert ckpt.shape(key) == expected.shape and ckpt.dtype(key) == expected.dtype
            assert _same_bits(ckpt.get(key), expected), key
        key = "model.layers.1.mlp.down_proj.weight"
        as_f32 = ckpt.get(key, dtype=np.float32)
        assert as_f32.dtype == np.float32
        np.testing.assert_array_equal(as_f32, state[key].float().numpy())
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.get(key)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_sharded_save_loads_in_transformers(tmp_path: Path, dtype_name: str) -> None:
    torch = pytest.importorskip("torch")
    import transformers

    model = _tiny_llama(getattr(torch, dtype_name))
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with open_checkpoint(tmp_path / "hf") as ckpt:
        # A generator: save_checkpoint streams it, one shard in memory at a time.
        pairs = ((k, ckpt.get(k)) for k in ckpt.keys())
        out = save_checkpoint(tmp_path / "copy", pairs, ckpt.config, max_shard_bytes=16_000)
    assert out == tmp_path / "copy"
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert files == sorted(["config.json", "model.safetensors.index.json", *shards])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert index["metadata"]["total_size"] == nbytes
    with safe_open(out / shards[0], "np") as f:
        assert f.metadata() == {"format": "pt"}

    auto = transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(out, dtype=getattr(torch, dtype_name))
    state, new_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == new_state.keys()
    for key, value in state.items():
        assert value.dtype == new_state[key].dtype and torch.equal(value, new_state[key]), key
    with open_checkpoint(out) as back:
        assert sorted(back.keys()) == sorted(state)
        key = "model.layers.0.self_attn.o_proj.weight"
        assert back.file_of(key).name in shards
        assert _same_bits(back.get(key), _to_numpy(state[key]))


def test_bf16_roundtrip_without_torch(tmp_path: Path) -> None:
    tensors = _tensors(dtype=BF16)
    tensors["norm.weight"] = np.ones(8, np.float32)
    save_checkpoint(tmp_path / "c", tensors, {"model_type": "llama", "hidden_size": 8})
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "model.safetensors"]
    with open_checkpoint(tmp_path / "c") as ckpt:
        assert ckpt.config == {"hidden_size": 8, "model_type": "llama"}
        for key, value in tensors.items():
            assert ckpt.dtype(key) == value.dtype
            assert _same_bits(ckpt.get(key), value)
        key = "model.layers.1.mlp.up_proj.weight"
        np.testing.assert_array_equal(ckpt.get(key, np.float32), tensors[key].astype(np.float32))


def test_exotic_dtypes_scalars_and_empty_tensors(tmp_path: Path) -> None:
    tensors = {
        "f8": np.linspace(-2, 2, 6).astype(ml_dtypes.float8_e4m3fn).reshape(2, 3),
        "f8b": np.ones(3, ml_dtypes.float8_e5m2),
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 4), BF16),
        "mask": np.array([True, False]),
        "ids": np.arange(5, dtype=np.int64),
        "transposed": np.arange(6, dtype=np.float16).reshape(2, 3).T,  # not C-contiguous
    }
    save_checkpoint(tmp_path / "c", tensors, {})
    with open_checkpoint(tmp_path / "c") as ckpt:
        for key, value in tensors.items():
            got = ckpt.get(key)
            assert _same_bits(got, np.asarray(value, order="C")), key
            assert got.flags.writeable and ckpt.shape(key) == np.shape(value)


def test_one_shard_is_written_unsharded(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", _tensors(), {}, max_shard_bytes=1 << 30)
    assert sorted(os.listdir(tmp_path / "c")) == ["config.json", "model.safetensors"]


def test_get_reads_only_that_tensor(tmp_path: Path) -> None:
    big = {f"w{i}": np.full((256, 1024), i, np.float32) for i in range(8)}  # 1 MiB each
    save_checkpoint(tmp_path / "c", big, {})
    with open_checkpoint(tmp_path / "c") as ckpt:
        tracemalloc.start()
        try:
            w = ckpt.get("w5")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert float(w[0, 0]) == 5.0
        assert w.nbytes <= peak < 3 * w.nbytes  # one tensor's worth, not the 8 MiB file


# ------------------------------------------------------------------------------------------
# Errors and atomicity
# ------------------------------------------------------------------------------------------


def _ckpt(path: Path, **kw: Any) -> Path:
    return save_checkpoint(path, _tensors(), {"model_type": "llama"}, **kw)


def test_open_refuses_bad_checkpoints(tmp_path: Path) -> None:
    p = _ckpt(tmp_path / "noconfig")
    (p / "config.json").unlink()
    file = re.escape(str(p / "config.json"))
    with pytest.raises(CheckpointError, match=rf"^{file}: file not found"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "badjson")
    (p / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config\.json: invalid JSON"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "noweights")
    (p / "model.safetensors").rename(p / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"noweights: no model\.safetensors or model\."
                                              r"safetensors\.index\.json; found pytorch_model"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "truncated")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"truncated/model\.safetensors: not a readable"):
        open_checkpoint(p)

    with pytest.raises(CheckpointError, match=r"not a directory"):
        open_checkpoint(tmp_path / "nowhere")

    p = _ckpt(tmp_path / "hole")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"hole/model\.safetensors: .*header describes"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "ok")
    with open_checkpoint(p) as ckpt, pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(p))}: no tensor named 'lm_head\.weight'"
    ):
        ckpt.get("lm_head.weight")


def test_open_refuses_bad_shards(tmp_path: Path) -> None:
    p = _ckpt(tmp_path / "missing", max_shard_bytes=600)
    (p / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing/model-00002-of-00003\.safetensors: "
                                              r"shard listed in model\.safetensors\.index\.json"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "wrongkey", max_shard_bytes=600)
    index = json.loads((p / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.weight"] = "model-00001-of-00003.safetensors"
    (p / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: lists 'extra\.weight' in "
                                              r"model-00001-of-00003\.safetensors, which has no"):
        open_checkpoint(p)

    p = _ckpt(tmp_path / "corrupt", max_shard_bytes=600)
    (p / "model-00003-of-00003.safetensors").write_bytes(b"\0" * 20)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003\.safetensors: not a read"):
        open_checkpoint(p)


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"tensor 'a' given twice"):
        save_checkpoint(tmp_path / "dup", [("a", np.ones(2)), ("a", np.ones(2))], {})
    with pytest.raises(CheckpointError, match=r"config\.json: config is not JSON-serialisable"):
        save_checkpoint(tmp_path / "cfg", {"a": np.ones(2)}, {"x": object()})
    with pytest.raises(CheckpointError, match=r"tensor 'a' has dtype object"):
        save_checkpoint(tmp_path / "obj", {"a": np.array([None])}, {})
    with pytest.raises(CheckpointError, match=r"max_shard_bytes must be a positive int"):
        save_checkpoint(tmp_path / "shard", {"a": np.ones(2)}, {}, max_shard_bytes=0)
    assert os.listdir(tmp_path) == []


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save_file = bridge.checkpoint.save_file
    calls = []

    def fail_on_second_shard(tensors: Any, filename: str, metadata: Any = None) -> None:
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(bridge.checkpoint, "save_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        _ckpt(tmp_path / "c", max_shard_bytes=600)
    assert len(calls) == 2 and os.listdir(tmp_path) == []

    # Replacing an existing checkpoint: the old one survives a failure, a success replaces it.
    monkeypatch.undo()
    save_checkpoint(tmp_path / "c", {"old": np.zeros(3, np.float32)}, {})
    monkeypatch.setattr(bridge.checkpoint, "save_file", fail_on_second_shard)
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        _ckpt(tmp_path / "c", max_shard_bytes=600)
    assert os.listdir(tmp_path) == ["c"]
    with open_checkpoint(tmp_path / "c") as ckpt:
        assert ckpt.keys() == ["old"]
    monkeypatch.undo()
    _ckpt(tmp_path / "c", max_shard_bytes=600)
    assert os.listdir(tmp_path) == ["c"]
    with open_checkpoint(tmp_path / "c") as ckpt:
        assert sorted(ckpt.keys()) == sorted(_tensors())
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file: exists and is not a directory"):
        _ckpt(tmp_path / "file")


def test_save_file_is_plain_safetensors(tmp_path: Path) -> None:
    """What we write is readable by safetensors itself, with the metadata transformers wants."""
    _ckpt(tmp_path / "c")
    with safe_open(tmp_path / "c" / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(_tensors())
    save_file({"x": np.ones(1, np.float32)}, tmp_path / "c" / "model.safetensors")
    with open_checkpoint(tmp_path / "c") as ckpt:  # metadata is not required to read
        assert ckpt.keys() == ["x"]
