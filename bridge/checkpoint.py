"""Hugging Face model checkpoints: lazy per-tensor reads, atomic (sharded) writes.

A checkpoint directory is ``config.json`` plus either one ``model.safetensors`` or shards
``model-0000i-of-0000N.safetensors`` listed in ``model.safetensors.index.json``. Reading never
loads the whole model: `CheckpointReader.get` reads the bytes of one tensor, nothing else, in
its stored dtype (bf16 as ``ml_dtypes.bfloat16``) unless you ask for another::

    >>> import numpy as np
    >>> from bridge import open_checkpoint, save_checkpoint
    >>> with open_checkpoint("Llama-3.1-8B-Instruct") as ckpt:       # 4 shards, 16 GB of bf16
    ...     ckpt.config["hidden_size"]                               # 4096
    ...     key = "model.layers.0.self_attn.q_proj.weight"
    ...     ckpt.shape(key), ckpt.dtype(key)                         # (4096, 4096), bfloat16
    ...     w = ckpt.get(key, dtype=np.float32)                      # reads 32 MiB, nothing else
    ...     save_checkpoint("copy", ((k, ckpt.get(k)) for k in ckpt.keys()),
    ...                     ckpt.config, max_shard_bytes=5 << 30)
    # copy/: config.json, model-0000{1..4}-of-00004.safetensors, model.safetensors.index.json

`save_checkpoint` consumes an iterable one shard at a time, so the copy above holds at most one
shard in memory. Every write goes to a temporary directory beside the destination, which is
renamed into place only when complete (`atomic_directory`). Bad files raise `CheckpointError`,
whose one-line message names the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from bridge.errors import CheckpointError

__all__ = [
    "CheckpointReader",
    "SafetensorsFile",
    "atomic_directory",
    "open_checkpoint",
    "save_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it

# safetensors dtype tag -> numpy dtype (bf16 / fp8 through ml_dtypes).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):  # newer ml_dtypes only
    SAFETENSORS_DTYPES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_WRITABLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())


class SafetensorsFile:
    """One safetensors file: its header parsed up front, single tensors read on demand.

    Format: 8-byte little-endian header length N, N bytes of JSON
    ``{key: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}``,
    then the data. The header is validated as the safetensors library does (known layout,
    sizes matching shapes, data fully covered). `read` does one positioned read of exactly
    that tensor's bytes into a fresh array, viewed with the numpy dtype (bf16 and fp8 via
    ``ml_dtypes``, which the ``safetensors`` numpy backend cannot always produce).
    """

    _MAX_HEADER = 100_000_000  # the safetensors library's limit

    def __init__(self, file: Path, error: type[ValueError] = CheckpointError) -> None:
        self.file = file
        self._error = error
        self._lock = threading.Lock()
        if not file.is_file():
            raise error(file, "file not found")
        try:
            self._fh: Any = open(file, "rb", buffering=0)  # closed by close()
        except OSError as exc:
            raise error(file, f"cannot open file ({exc})") from exc
        try:
            self._parse_header()
        except BaseException:
            self._fh.close()
            raise

    def _bad(self, problem: str) -> ValueError:
        return self._error(self.file, f"not a readable safetensors file ({problem})")

    def _parse_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise self._bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", self._read_at(0, 8))
        if n > min(size - 8, self._MAX_HEADER):
            raise self._bad(f"header length {n} exceeds the file")
        try:
            header = json.loads(self._read_at(8, n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._bad(f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._bad("__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self._data_start = 8 + n
        self.bytes_read = 0  # tensor bytes read so far (headers not counted)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
                shape = tuple(shape)
                if not (isinstance(tag, str) and all(_is_size(d) for d in shape)
                        and _is_size(begin) and _is_size(end) and begin <= end):
                    raise TypeError
            except (TypeError, KeyError, ValueError) as exc:
                raise self._bad(f"bad header entry for {key!r}: {info!r}") from exc
            if tag in SAFETENSORS_DTYPES:
                want = math.prod(shape) * SAFETENSORS_DTYPES[tag].itemsize
                if end - begin != want:
                    raise self._bad(f"tensor {key!r} has {end - begin} bytes, shape needs {want}")
            self._entries[key] = (tag, shape, begin, end)
        covered = 0
        for _, _, begin, end in sorted(self._entries.values(), key=lambda e: (e[2], e[3])):
            if begin != covered:
                raise self._bad("tensor data overlaps or leaves holes")
            covered = end
        if covered != size - self._data_start:
            raise self._bad(
                f"data is {size - self._data_start} bytes, the header describes {covered}"
            )

    def _read_at(self, offset: int, n: int, out: Any = None) -> Any:
        buf = bytearray(n) if out is None else out
        view = memoryview(buf).cast("B")
        with self._lock:
            if self._fh is None:
                raise self._error(self.file, "file is closed")
            self._fh.seek(offset)
            got = 0
            while got < n:
                k = self._fh.readinto(view[got:])
                if not k:
                    raise self._bad(f"truncated: wanted {n} bytes at offset {offset}")
                got += k
        return buf

    def keys(self) -> list[str]:
        """Tensor keys, sorted."""
        return sorted(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        tag = self._entries[key][0]
        if tag not in SAFETENSORS_DTYPES:
            raise self._error(self.file, f"tensor {key!r} has unsupported dtype {tag}")
        return SAFETENSORS_DTYPES[tag]

    def read(self, key: str) -> np.ndarray:
        """Exactly tensor ``key``, as a fresh writable array in its stored dtype."""
        dtype = self.dtype(key)
        _, shape, begin, end = self._entries[key]
        arr = np.empty(shape, dtype=dtype)
        if end > begin:
            self._read_at(self._data_start + begin, end - begin, out=arr.reshape(-1).view(np.uint8))
            self.bytes_read += end - begin
        return arr

    def read_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """``tensor[index]`` (unit-step slices, one per leading axis) reading only those bytes:
        one positioned read per contiguous run, so a multi-host loader reads just its shards.
        """
        dtype = self.dtype(key)
        _, shape, begin, _ = self._entries[key]
        if not shape:
            return self.read(key)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [slice(sl.start, sl.stop).indices(n)[:2] for sl, n in zip(index, shape,
                                                                          strict=True)]
        out_shape = tuple(max(0, hi - lo) for lo, hi in bounds)
        arr = np.empty(out_shape, dtype=dtype)
        if not arr.size:
            return arr
        # Axes after the last partial one are whole: each run spans them contiguously.
        partial = [i for i, (lo, hi) in enumerate(bounds) if (lo, hi) != (0, shape[i])]
        k = partial[-1] if partial else 0
        inner = math.prod(shape[k + 1:])
        run = out_shape[k] * inner * dtype.itemsize
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        flat = arr.reshape(-1).view(np.uint8)
        for n, outer in enumerate(np.ndindex(*out_shape[:k])):
            first = sum((bounds[i][0] + j) * strides[i] for i, j in enumerate(outer))
            first += bounds[k][0] * strides[k]
            self._read_at(self._data_start + begin + first * dtype.itemsize, run,
                          out=flat[n * run:(n + 1) * run])
        self.bytes_read += arr.nbytes
        return arr

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_json(file: Path, error: type[ValueError] = CheckpointError) -> dict[str, Any]:
    """Read a JSON object; a missing, unreadable or non-object file raises ``error(file, ...)``."""
    if not file.is_file():
        raise error(file, "file not found")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(file, f"cannot read file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise error(file, f"invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(file, f"expected a JSON object, got {type(data).__name__}")
    return data


class CheckpointReader:
    """Lazy, read-only view of a checkpoint's tensors. Build it with `open_checkpoint`.

    Holds the safetensors files open with their headers parsed; `get` reads exactly one
    tensor. Use it as a context manager, or call `close`.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        files: dict[str, SafetensorsFile],
        weight_map: dict[str, str],
    ) -> None:
        self.path = path
        self.config = config
        self._files: dict[str, SafetensorsFile] | None = files  # file name -> open file
        self._weight_map = weight_map  # tensor key -> file name

    # -- lookup ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor key (sorted within a file; index order across shards)."""
        return list(self._weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self._weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._weight_map)

    def __len__(self) -> int:
        return len(self._weight_map)

    def file_of(self, key: str) -> Path:
        """The safetensors file holding ``key``."""
        return self._locate(key).file

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (no data read)."""
        return self._locate(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        """The tensor's stored numpy dtype (``ml_dtypes.bfloat16`` for BF16)."""
        return self._locate(key).dtype(key)

    def get(self, key: str, dtype: Any = None) -> np.ndarray:
        """Read only tensor ``key`` (a fresh numpy array), cast to ``dtype`` if given."""
        arr = self._locate(key).read(key)
        if dtype is not None and arr.dtype != np.dtype(dtype):
            arr = arr.astype(dtype)
        return arr

    def get_slice(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Read only ``tensor[index]`` of tensor ``key`` (stored dtype; see `read_slice`)."""
        return self._locate(key).read_slice(key, index)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read through this reader so far, over all its files."""
        return sum(f.bytes_read for f in (self._files or {}).values())

    def _locate(self, key: str) -> SafetensorsFile:
        if self._files is None:
            raise CheckpointError(self.path, "checkpoint reader is closed")
        name = self._weight_map.get(key)
        if name is None:
            raise CheckpointError(self.path, f"no tensor named {key!r} in this checkpoint")
        return self._files[name]

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap every file; later reads raise `CheckpointError`."""
        if self._files is not None:
            for file in self._files.values():
                file.close()
            self._files = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors)"


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a Hugging Face checkpoint directory for lazy per-tensor reads.

    Reads ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
    with its shards (every shard must exist and hold the keys the index gives it).
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(root, "not a directory (expected a Hugging Face checkpoint)")
    config = read_json(root / CONFIG_NAME)
    files: dict[str, SafetensorsFile] = {}
    try:
        if (root / WEIGHTS_NAME).is_file():
            files[WEIGHTS_NAME] = SafetensorsFile(root / WEIGHTS_NAME)
            weight_map = {k: WEIGHTS_NAME for k in files[WEIGHTS_NAME].keys()}
        elif (root / INDEX_NAME).is_file():
            weight_map = _read_index(root, files)
        else:
            legacy = [p.name for p in root.glob("pytorch_model*.bin")]
            hint = (
                f"; found {legacy[0]}: only safetensors checkpoints are supported, "
                "re-save with save_pretrained(safe_serialization=True)"
                if legacy
                else ""
            )
            raise CheckpointError(root, f"no {WEIGHTS_NAME} or {INDEX_NAME}{hint}")
    except BaseException:
        for file in files.values():
            file.close()
        raise
    return CheckpointReader(root, config, files, weight_map)


def _read_index(root: Path, files: dict[str, SafetensorsFile]) -> dict[str, str]:
    index_file = root / INDEX_NAME
    index = read_json(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(index_file, "weight_map must map tensor names to file names")
    for key, name in weight_map.items():
        if Path(name).name != name:
            raise CheckpointError(index_file, f"shard name {name!r} for {key!r} is not a file name")
        if name not in files:
            if not (root / name).is_file():
                raise CheckpointError(root / name, f"shard listed in {INDEX_NAME} is missing")
            files[name] = SafetensorsFile(root / name)
    for key, name in weight_map.items():
        if key not in files[name]:
            raise CheckpointError(index_file, f"lists {key!r} in {name}, which has no such tensor")
    return dict(weight_map)


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_directory(
    dest: str | os.PathLike[str], error: type[ValueError] = CheckpointError
) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; on success rename it to ``dest``.

    An existing ``dest`` directory is replaced (moved aside, then deleted once the new one is in
    place; moved back if that rename fails). On any exception the temporary directory is
    removed and ``dest`` is left as it was.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise error(dest, "exists and is not a directory; refusing to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # plain mkdir (not mkdtemp) so the final directory gets the usual permissions
    try:
        yield tmp
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(src, dest)
        return
    backup = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(dest, backup)
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(backup, dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def write_json(file: Path, data: Mapping[str, Any], *, sort_keys: bool = True) -> None:
    """Write ``data`` as indented JSON, keys sorted at every level unless ``sort_keys=False``."""
    file.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n", encoding="utf-8")


def _as_array(key: object, value: Any, file: Path) -> np.ndarray:
    if not isinstance(key, str) or not key:
        raise CheckpointError(file, f"tensor names must be non-empty strings, got {key!r}")
    arr = np.asarray(value, order="C")  # not ascontiguousarray: that makes scalars 1-D
    if arr.dtype not in _WRITABLE_DTYPES:
        raise CheckpointError(file, f"tensor {key!r} has dtype {arr.dtype}, not storable")
    return arr


def check_write_args(root: Path, config: Mapping[str, Any], max_shard_bytes: int | None) -> str:
    """Refuse a bad shard size or a config that is not JSON before anything is written;
    returns the ``config.json`` text. Shared by `save_checkpoint` and `stream_checkpoint`."""
    if max_shard_bytes is not None and (
        isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
        or max_shard_bytes <= 0
    ):
        raise CheckpointError(
            root, f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}"
        )
    try:
        return json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError) as exc:
        raise CheckpointError(root / CONFIG_NAME, f"config is not JSON-serialisable ({exc})") \
            from exc


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Any] | Iterable[tuple[str, Any]],
    config: dict[str, Any],
    *,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``config.json`` and the tensors as a checkpoint ``transformers`` can load.

    ``tensors`` is a mapping or an iterable of ``(key, array)`` (numpy, or anything
    ``np.asarray`` takes; dtypes are kept). Without ``max_shard_bytes`` everything goes to one
    ``model.safetensors``. With it, tensors are packed in order into shards of at most that many
    bytes (a larger tensor gets a shard of its own), written as they fill, and listed in
    ``model.safetensors.index.json``; if they all fit in one shard it is written as
    ``model.safetensors`` with no index, as ``save_pretrained`` does. The write is atomic.
    Returns the checkpoint directory.
    """
    root = Path(path)
    config_text = check_write_args(root, config, max_shard_bytes)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors

    with atomic_directory(root) as tmp:
        (tmp / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        shard_files: list[tuple[Path, list[str]]] = []
        shard: dict[str, np.ndarray] = {}
        shard_bytes = total_bytes = 0
        seen: set[str] = set()

        def flush() -> None:
            file = tmp / f".shard-{len(shard_files):05d}"
            save_file(shard, os.fspath(file), metadata=_METADATA)
            shard_files.append((file, list(shard)))
            shard.clear()

        for key, value in items:
            arr = _as_array(key, value, root)
            if key in seen:
                raise CheckpointError(root, f"tensor {key!r} given twice")
            seen.add(key)
            if max_shard_bytes is not None and shard and shard_bytes + arr.nbytes > max_shard_bytes:
                flush()
                shard_bytes = 0
            shard[key] = arr
            shard_bytes += arr.nbytes
            total_bytes += arr.nbytes
        if shard or not shard_files:
            flush()

        if len(shard_files) == 1:
            os.replace(shard_files[0][0], tmp / WEIGHTS_NAME)
        else:
            n = len(shard_files)
            weight_map: dict[str, str] = {}
            for i, (file, keys) in enumerate(shard_files, start=1):
                name = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(file, tmp / name)
                weight_map.update((k, name) for k in keys)
            index = {
                "metadata": {"total_size": total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(tmp / INDEX_NAME, index)
    return root
