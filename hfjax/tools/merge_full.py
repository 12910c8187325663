"""A base checkpoint plus a PEFT LoRA, merged into a plain Hugging Face checkpoint.

Each adapted linear weight becomes ``W + scale · B @ A`` (computed in float32, the scale per
module as PEFT resolves it: rsLoRA, rank_pattern and alpha_pattern included); every other
tensor is copied as is. The result is what ``PeftModel.merge_and_unload().save_pretrained``
would write, without ever holding the model in memory::

    >>> merge_full("qwen2-7b", "experts/conll04-lora", "qwen2-7b-conll04", dtype="bfloat16")
    {"out_dir": "qwen2-7b-conll04", "tensors": 339, "merged": 196, "shards": 8, ...}
    # qwen2-7b-conll04/: config.json, model-0000{1..8}-of-00008.safetensors + index, tokenizer

Tensors are read, merged and written one at a time (`bridge.checkpoint_stream`): peak memory
is about one weight matrix in float32, whatever the model size. The output directory is
written atomically. Every adapter module must be a linear layer of the base with matching
shapes; anything else is refused, naming the adapter file, before any output is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bridge.checkpoint import CheckpointReader, open_checkpoint
from bridge.checkpoint_stream import stream_checkpoint
from bridge.errors import AdapterError
from bridge.lora_adapter import LoraModule
from bridge.peft_io import SAFETENSORS_NAME, load_adapter
from hfjax.tools._shared import (
    ToolError,
    check_shapes,
    linear_modules,
    model_config,
    tokenizer_files,
)

__all__ = ["DTYPES", "merge_full"]

# Output dtypes (--dtype): floating tensors are cast to it, others kept; None keeps each stored.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB per safetensors shard


def _out_dtype(stored: np.dtype, dtype: np.dtype | None) -> np.dtype:
    return dtype if dtype is not None and stored in DTYPES.values() else stored


def _merged(ckpt: CheckpointReader, key: str, module: LoraModule | None,
            dtype: np.dtype | None, adapter_file: Path) -> np.ndarray:
    stored = ckpt.dtype(key)
    out = _out_dtype(stored, dtype)
    if module is None:
        return ckpt.get(key, out)
    w = ckpt.get(key, np.float32)
    w += np.float32(module.scale) * (module.B.astype(np.float32) @ module.A.astype(np.float32))
    with np.errstate(over="ignore", invalid="ignore"):
        w = w.astype(out, copy=False)
    if not np.isfinite(w).all():
        raise AdapterError(adapter_file, f"{module.name}: the merged weight is not finite in {out}")
    return w


def merge_full(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Merge the LoRA in ``adapter_dir`` into the checkpoint ``base_dir``, written to ``out_dir``.

    ``dtype`` ("float32" | "bfloat16" | "float16") casts the floating tensors of the output;
    None keeps the base's stored dtypes. Returns a small report (counts, sizes, files).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ToolError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    cast = DTYPES[dtype] if dtype is not None else None
    adapter = load_adapter(adapter_dir)
    weights_file = Path(adapter_dir) / SAFETENSORS_NAME
    with open_checkpoint(base_dir) as base:
        cfg = model_config(base)
        check_shapes(base, cfg)
        linear = linear_modules(cfg)
        for name, m in adapter.modules.items():
            spec = linear.get(name)
            if spec is None:
                raise AdapterError(weights_file, f"module {name!r} is not a linear layer of the "
                                   f"base {cfg.model_type} model in {base.path}")
            d_out, d_in = base.shape(spec.hf)
            if (m.d_out, m.d_in) != (d_out, d_in):
                raise AdapterError(weights_file, f"{name}: LoRA is {m.d_out}x{m.d_in} (B@A), "
                                   f"the base weight {spec.hf} is {d_out}x{d_in}")
        modules = {linear[name].hf: m for name, m in adapter.modules.items()}
        keys = base.keys()
        layout = [(k, base.shape(k), _out_dtype(base.dtype(k), cast)) for k in keys]
        config = dict(base.config)
        if dtype is not None:
            config.pop("torch_dtype", None)
            config["dtype"] = dtype

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for k in keys:
                yield k, _merged(base, k, modules.get(k), cast, weights_file)

        out = Path(out_dir)
        extra = tokenizer_files(base.path)
        stream_checkpoint(out, layout, tensors(), config, max_shard_bytes=max_shard_bytes,
                          extra_files=extra)
    files = sorted(p.name for p in out.iterdir())
    return {
        "out_dir": str(out),
        "model_type": cfg.model_type,
        "tensors": len(keys),
        "merged": len(modules),
        "bytes": sum(int(np.prod(s)) * d.itemsize for _, s, d in layout),
        "shards": sum(f.endswith(".safetensors") for f in files),
        "copied": [p.name for p in extra],
    }
