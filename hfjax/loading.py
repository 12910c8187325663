"""from_pretrained / save_pretrained: HF checkpoint directories <-> `Decoder`.

Loading walks the model's key table (`hfjax.models.key_tables`): for each row it reads ONE
tensor lazily through `bridge.open_checkpoint`, applies the row's hook (transpose), casts it
and places it on device — straight into its sharding when a mesh is given (each device
receives only its slice, via `jax.make_array_from_callback`). Host memory therefore holds at
most one tensor beyond what has already been placed; the full model never exists twice.
Tensors are read largest first and glibc's heap is trimmed once every `_TRIM_EVERY` bytes read,
so loading adds little beyond the parameters themselves (docs/performance.md §4.5;
`hfjax bench` measures it).

Multi-host (a mesh spanning several processes), each process reads only the bytes of its
own shards (`bridge`'s ``get_slice``: one positioned read per contiguous run), never the
whole tensor; ``stats["bytes_read"]`` reports the tensor bytes a load read.

Export walks the same table the other way and writes with `bridge.save_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bridge.checkpoint import open_checkpoint, save_checkpoint
from bridge.errors import CheckpointError, UserError
from hfjax.machine import release_free_heap
from hfjax.models.config import ModelConfig, ModelConfigError
from hfjax.models.key_tables import (
    IGNORED_HF_SUFFIXES,
    hf_shape,
    iter_params,
    key_table,
    set_path,
    stacked_path,
)
from hfjax.models.model import Decoder

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
           "fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None or not isinstance(dtype, str):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (known: {', '.join(_DTYPES)})") from None


def _sharding_for(axes: tuple[str | None, ...], mesh: Mesh | None,
                  rules: Sequence[tuple[str, Any]] | None) -> NamedSharding | None:
    if mesh is None:
        return None
    from flax import linen as nn

    spec = nn.logical_to_mesh_axes(PartitionSpec(*axes), rules or ())
    return NamedSharding(mesh, spec)


def _place(x: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
    if sharding is None:
        return jax.block_until_ready(jax.device_put(x))  # done copying before x is freed
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _place_own_shards(reader: Any, spec: Any, dtype: Any, sharding: NamedSharding
                      ) -> jax.Array:
    """Read and place only this process's shards of one tensor (multi-host loading)."""
    hf = tuple(reader.shape(spec.hf))
    ours = hf[::-1] if spec.transpose else hf
    cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def bounds(idx: tuple[slice, ...]) -> tuple[tuple[int, int], ...]:
        return tuple(sl.indices(n)[:2] for sl, n in zip(idx, ours, strict=True))

    for idx in sharding.addressable_devices_indices_map(ours).values():
        b = bounds(tuple(idx) + (slice(None),) * (len(ours) - len(idx)))
        if b in cache:
            continue
        hf_b = b[::-1] if spec.transpose else b
        x = spec.to_ours(reader.get_slice(spec.hf, tuple(slice(lo, hi) for lo, hi in hf_b)))
        cache[b] = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
    return jax.make_array_from_callback(
        ours, sharding,
        lambda idx: cache[bounds(tuple(idx) + (slice(None),) * (len(ours) - len(idx)))])


def from_pretrained(path: str | Path, dtype: Any = None, *, mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None,
                    stats: dict[str, int] | None = None, stacked: bool = False) -> Decoder:
    """Load an HF Llama / Qwen2 / Mistral checkpoint directory into a `Decoder`.

    ``dtype``: parameter (and compute) dtype, e.g. ``jnp.float32`` or ``"bfloat16"``; ``None``
    keeps each tensor's stored dtype. ``mesh`` + ``rules`` (logical axis -> mesh axes) place
    every tensor straight into its sharding (multi-host: reading only this process's shards).
    ``stats``: a dict that receives ``bytes_read`` (tensor bytes read from disk).
    ``stacked``: the layers as one pytree of (N, ...) arrays (the layout
    `hfjax.models.decoder.forward` scans over); each stacked leaf is a preallocated host array
    filled tensor by tensor, placed, then freed, so host memory holds at most one stacked leaf
    (N tensors) beyond what is placed.
    """
    path = Path(path)
    dtype = resolve_dtype(dtype)
    with open_checkpoint(path) as reader:
        cfg = ModelConfig.from_hf(reader.config, source=str(path / "config.json"))
        table = key_table(cfg)
        keys = set(reader.keys())
        wanted = {spec.hf for spec in table}
        missing = sorted(wanted - keys)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(
                f"{path}: checkpoint lacks {', '.join(missing[:3])}{more}")
        extra = sorted(k for k in keys - wanted
                       if not k.endswith(IGNORED_HF_SUFFIXES)
                       and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
        if extra:
            more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
            raise CheckpointError(
                f"{path}: checkpoint has tensors this {cfg.model_type} model does not use: "
                f"{', '.join(extra[:3])}{more}")
        params: dict = {}
        for spec in table:
            shape = tuple(reader.shape(spec.hf))
            if shape != hf_shape(spec, cfg):
                raise CheckpointError(
                    f"{path}: {spec.hf} has shape {shape}, config.json implies "
                    f"{hf_shape(spec, cfg)}")
            set_path(params, spec.ours, None)  # the tree's layout follows the table
        # Largest tensors first: the transient host copies (read buffer, cast, transpose)
        # are biggest while little is resident yet, and near the end only small ones remain.
        # With glibc's heap trimmed as it goes, this keeps the peak RSS near the parameters
        # added (docs/performance.md §4.5).
        if stacked:
            return Decoder(config=cfg, params=_load_stacked(reader, table, cfg, dtype, mesh,
                                                            rules), path=str(path))
        by_size = sorted(table, key=lambda sp: -int(np.prod(reader.shape(sp.hf))))
        untrimmed = 0
        for spec in by_size:
            sharding = _sharding_for(spec.axes, mesh, rules)
            if sharding is not None and not sharding.is_fully_addressable:
                set_path(params, spec.ours, _place_own_shards(reader, spec, dtype, sharding))
                continue
            x = spec.to_ours(reader.get(spec.hf))
            if dtype is not None:
                x = x.astype(dtype)
            set_path(params, spec.ours, _place(x, sharding))
            untrimmed += x.nbytes
            del x
            if untrimmed >= _TRIM_EVERY:
                release_free_heap()
                untrimmed = 0
        if stats is not None:
            stats["bytes_read"] = reader.bytes_read
    return Decoder(config=cfg, params=params, path=str(path))


def _load_stacked(reader: Any, table: Sequence[Any], cfg: ModelConfig, dtype: Any,
                  mesh: Mesh | None, rules: Sequence[tuple[str, Any]] | None) -> dict:
    """Params with stacked layers: one preallocated (N, ...) host array per layer leaf,
    filled layer by layer from the checkpoint, placed, and freed before the next."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for spec in table:
        key = ("layers", *stacked_path(spec.ours)) if spec.ours[0] == "layers" else spec.ours
        groups.setdefault(key, []).append(spec)
    params: dict = {}
    order = sorted(groups, key=lambda k: -sum(int(np.prod(reader.shape(sp.hf)))
                                              for sp in groups[k]))
    for key in order:
        specs = groups[key]
        if key[0] != "layers":
            (spec,) = specs
            x = spec.to_ours(reader.get(spec.hf))
            x = x.astype(dtype) if dtype is not None else x
            set_path(params, key, _place(x, _sharding_for(spec.axes, mesh, rules)))
            del x
            continue
        buf = None
        for spec in specs:
            x = spec.to_ours(reader.get(spec.hf))
            if buf is None:
                shape = (cfg.num_hidden_layers, *x.shape)
                buf = np.empty(shape, np.dtype(dtype) if dtype is not None else x.dtype)
            buf[spec.ours[1]] = x
            del x
        set_path(params, key, _place(buf, _sharding_for((None, *specs[0].axes), mesh, rules)))
        del buf
        release_free_heap()
    return params


# malloc_trim walks the whole heap, so trimming after every small tensor made repeated
# loads of small models much slower (docs/performance.md §4.5). Big checkpoints still trim
# after every large tensor; at most this many bytes of freed host copies wait for the
# next trim.
_TRIM_EVERY = 64 * 2**20


class TokenizerError(UserError):
    """The checkpoint's tokenizer files are missing or unreadable."""


def load_tokenizer(model_path: str | Path) -> Any:
    """The checkpoint's tokenizer (transformers), or one clear line naming the directory."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_path))
    except (ValueError, KeyError, TypeError, OSError) as e:  # bad or missing files only
        if isinstance(e, OSError) and e.errno is not None:
            raise  # the machine's error (disk, permission), not the checkpoint's
        first = str(e).splitlines()[0] if str(e) else ""
        raise TokenizerError(f"{model_path}: cannot load the tokenizer ({type(e).__name__}: "
                             f"{first})") from e


def hf_tensors(decoder: Decoder, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF key, numpy array) for every parameter, one at a time (for export)."""
    dtype = resolve_dtype(dtype)
    for spec, x in iter_params(decoder.params, decoder.config):
        arr = np.asarray(jax.device_get(x if dtype is None else x.astype(dtype)))
        yield spec.hf, spec.to_hf(arr)


def save_pretrained(decoder: Decoder, path: str | Path, *, dtype: Any = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write an HF checkpoint directory (config.json + safetensors) that transformers loads."""
    cfg_dict = decoder.config.to_hf_dict()
    if dtype is not None:
        cfg_dict["dtype"] = np.dtype(resolve_dtype(dtype)).name
    else:
        cfg_dict["dtype"] = np.dtype(decoder.dtype).name
    return save_checkpoint(path, hf_tensors(decoder, dtype), cfg_dict,
                                  max_shard_bytes=max_shard_bytes)


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32,
                std: float = 0.02) -> dict:
    """Random params for ``cfg`` (normal(0, std) weights, zero biases, unit norms: a Gemma
    norm weight is stored as an offset from 1, so it starts at zero)."""
    from hfjax.models.key_tables import our_shape

    params: dict = {}
    table = key_table(cfg)
    keys = jax.random.split(key, len(table))
    for k, spec in zip(keys, table, strict=True):
        shape = our_shape(spec, cfg)
        if str(spec.ours[-1]).endswith("norm"):
            x = (jnp.zeros if cfg.norm_kind == "gemma" else jnp.ones)(shape, dtype)
        elif spec.ours[-1] == "bias":
            x = jnp.zeros(shape, dtype)
        else:
            x = (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        set_path(params, spec.ours, x)
    return params


__all__ = ["ModelConfigError", "from_pretrained", "hf_tensors", "init_params", "load_tokenizer",
           "resolve_dtype", "save_pretrained"]
