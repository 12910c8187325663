"""Write a checkpoint one tensor at a time, when every name, shape and dtype is known up front.

`save_checkpoint` packs a whole shard in memory before writing it. Tools that transform a
checkpoint tensor by tensor (merge a LoRA, cast a dtype) already know the output layout from
the input headers, so each shard's safetensors header can be written first and the tensors
appended as they are produced; memory then holds one tensor, not one shard::

    >>> layout = [(k, ckpt.shape(k), ckpt.dtype(k)) for k in ckpt.keys()]
    >>> stream_checkpoint("out", layout, ((k, ckpt.get(k)) for k in ckpt.keys()),
    ...                   ckpt.config, max_shard_bytes=2 << 30)
    # out/: config.json, model-0000{1..N}-of-0000N.safetensors (+ index), or model.safetensors

Tensors must arrive in layout order with exactly the announced shape and dtype; anything else
raises `CheckpointError`. The write is atomic (`atomic_directory`): on any error, including
one raised by the iterable itself, nothing is left at the destination.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bridge.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    WEIGHTS_NAME,
    atomic_directory,
    check_write_args,
    write_json,
)
from bridge.errors import CheckpointError

__all__ = ["stream_checkpoint"]

_TAGS = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}
_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it

Layout = Sequence[tuple[str, Sequence[int], Any]]  # (name, shape, numpy dtype) per tensor


def _plan_shards(
    layout: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int | None
) -> list[list[int]]:
    """Indices into ``layout`` per shard, packed in order as `save_checkpoint` packs them."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(layout):
        nbytes = math.prod(shape) * dtype.itemsize
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _header(entries: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    """The 8-byte length + JSON header of one safetensors file, padded to 8-byte alignment."""
    header: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _check_layout(layout: Layout, root: Path) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    out, seen = [], set()
    for name, shape, dtype in layout:
        if not isinstance(name, str) or not name:
            raise CheckpointError(root, f"tensor names must be non-empty strings, got {name!r}")
        if name in seen:
            raise CheckpointError(root, f"tensor {name!r} given twice")
        seen.add(name)
        dt = np.dtype(dtype)
        if dt not in _TAGS:
            raise CheckpointError(root, f"tensor {name!r} has dtype {dt}, not storable")
        out.append((name, tuple(int(d) for d in shape), dt))
    return out


def stream_checkpoint(
    path: str | os.PathLike[str],
    layout: Layout,
    tensors: Iterable[tuple[str, Any]],
    config: dict[str, Any],
    *,
    max_shard_bytes: int | None = None,
    extra_files: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write ``config.json`` and ``tensors`` (in ``layout`` order) as an HF checkpoint.

    ``layout`` lists ``(name, shape, dtype)`` of every tensor; ``tensors`` yields
    ``(name, array)`` in the same order, each consumed and written before the next is asked
    for. Sharding follows `save_checkpoint` (one ``model.safetensors`` when everything fits in
    one shard). ``extra_files`` (tokenizer files, say) are copied in before the directory is
renamed into place. Returns the checkpoint directory.
    """
    root = Path(path)
    config_text = check_write_args(root, config, max_shard_bytes)
    entries = _check_layout(layout, root)
    if not entries:
        raise CheckpointError(root, "no tensors to write")
    shards = _plan_shards(entries, max_shard_bytes)
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]

    it = iter(tensors)
    with atomic_directory(root) as tmp:
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        weight_map: dict[str, str] = {}
        for file_name, members in zip(names, shards, strict=True):
            shard = [entries[i] for i in members]
            with open(tmp / file_name, "wb") as fh:
                fh.write(_header(shard))
                for name, shape, dtype in shard:
                    got = next(it, None)
                    if got is None:
                        raise CheckpointError(root, f"tensors ended before {name!r}")
                    key, value = got
                    arr = np.asarray(value, order="C")
                    if key != name or arr.shape != shape or arr.dtype != dtype:
                        raise CheckpointError(
                            root, f"expected tensor {name!r} {shape} {dtype}, got {key!r} "
                            f"{arr.shape} {arr.dtype}")
                    if arr.size:
                        fh.write(arr.reshape(-1).view(np.uint8).data)
                    weight_map[name] = file_name
                    del arr, value, got
        if next(it, None) is not None:
            raise CheckpointError(root, "more tensors than the layout lists")
        if n > 1:
            total = sum(math.prod(s) * d.itemsize for _, s, d in entries)
            write_json(tmp / INDEX_NAME, {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            })
        for extra in map(Path, extra_files):
            if extra.name in (CONFIG_NAME, INDEX_NAME, *names):
                raise CheckpointError(extra, "would overwrite a file of the checkpoint")
            shutil.copy2(extra, tmp / extra.name)
    return root
