"""Meshes, logical-axis rules and shardings for pytrees (scale-out of a fuse run).

Model and fusion code only *name* axes; this module maps the names onto a device mesh with
an ordered rule table (``cfg.mesh.rules``, flax's ``logical_axis_rules`` semantics: for each
array dimension the first matching rule whose mesh axes are still free wins)::

    mesh  = make_mesh(data=2, fsdp=2, tensor=2)        # 8 devices, axes (data, fsdp, tensor)
    rules = rules_from_config(cfg.mesh.rules)          # (("batch", ("data", "fsdp")), ...)
    # a base kernel (embed, q_heads) = (4096, 4096)  -> P("fsdp", "tensor"): 2048 x 2048 each
    # a net kernel   (block, fusion_embed) = (32768, 1024) -> P(("fsdp", "tensor"), None)
    # a micro-batch stack (accum, B, L)             -> P(None, ("data", "fsdp"), None)
    params = shard_params(base_params, logical_axes_tree(model_cfg), mesh, rules)

Logical names in use (`check_rules` refuses a spec whose name has no rule):

- base parameters (`hfjax.models.key_tables`): ``vocab, embed, q_heads, kv_heads, mlp, norm,
  head_dim`` (the last: per-head q/k norm scales of Qwen3 / Gemma 3);
- decoder activations (`hfjax.models.decoder`): ``batch, seq, embed, heads, mlp, vocab``;
- transfer networks (`hfjax.fusion.network`): ``block`` (the ``block_size * r`` token width,
  the big dimension) and ``lora_r`` keep their names; the network's other names (``embed``
  = E, ``qkv``, ``mlp``, ``gate_mlp``, ``pos``) collide with the model's, so
  `fusion_logical_specs` namespaces them as ``fusion_embed, fusion_qkv, ...``;
- block contexts: ``(None, "tokens", "block")`` and ``(None, "tokens", "lora_r")``.
- ``lora_r`` (a LoRA rank) is never sharded: `logical_to_mesh_spec` refuses a rule that would.

A dimension whose size does not divide by its mesh axes' product keeps only the leading mesh
axes that do divide it (down to replicated), so odd shapes degrade to less sharding instead
of failing to place; `rules_for_batch` does the same for the micro-batch size (the paper's
batch of 1 is then replicated over ``data``/``fsdp``, and FSDP still shards the weights).

The transfer networks run once per optimizer step on constant inputs, so they are the same
computation on every data-parallel replica; sharding ``block`` over ``fsdp`` and ``tensor``
splits their GEMMs (and their AdamW state) across devices at the price of all-reducing
``(tokens, 2E)`` activations.

Multi-host: call `maybe_initialize_distributed()` before any other JAX call. It runs
``jax.distributed.initialize`` when

- ``JAX_COORDINATOR_ADDRESS`` (``host:port``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  are all set (explicit), or
- ``HFJAX_DISTRIBUTED=1`` (let JAX auto-detect the cluster: SLURM, Open MPI, Kubernetes, TPU
  pods), or a multi-task SLURM job / Open MPI launch is detected
  (``SLURM_NTASKS > 1``, ``OMPI_COMM_WORLD_SIZE > 1``);

``HFJAX_DISTRIBUTED=0`` disables it. Every process then builds the same mesh over all global
devices; arrays are created with `jax.make_array_from_callback` (here and in
`hfjax.loading.from_pretrained`, which also reads only those shards from disk), so each
process only materialises its addressable shards. On CPU hosts the collectives are gloo (jax
0.10's default ``jax_cpu_collectives_implementation``). Results leave the devices through
`hfjax.distributed.gather_to_host`, and only `hfjax.distributed.is_primary` writes shared
files; launching is described in ``docs/multihost.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from hfjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names the code uses (documented above; `check_rules` checks specs against rules).
MODEL_PARAM_AXES = ("vocab", "embed", "q_heads", "kv_heads", "mlp", "norm", "head_dim")
MODEL_ACTIVATION_AXES = ("batch", "seq", "embed", "heads", "mlp", "vocab")
FUSION_AXES = ("block", "lora_r", "fusion_embed", "fusion_qkv", "fusion_mlp",
               "fusion_gate_mlp", "fusion_pos", "tokens")
NEVER_SHARDED = ("lora_r",)
# Network names that stay as they are; every other network axis name gets "fusion_".
_FUSION_KEEP = ("block", "lora_r")

Rules = tuple[tuple[str, Any], ...]


class ShardingError(UserError):
    """A mesh or rule table that cannot work (one line: what and why)."""


# ----------------------------------------------------------------------------- mesh
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh with Auto axis types (so logical constraints apply).

    One size may be ``-1``: all the devices the others leave. Without ``-1`` the sizes may
    cover a subset of the devices (the first ``data * fsdp * tensor``; e.g. ``data=1`` is a
    single-device run) but their product must divide the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [int(data), int(fsdp), int(tensor)]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ShardingError(f"mesh sizes must be positive, with at most one -1; got data={data}"
                            f" fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
        raise ShardingError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: {known} does not "
                            f"divide the {n} available devices")
    if -1 in sizes:
        sizes[sizes.index(-1)] = n // known
    used = math.prod(sizes)
    shape = tuple(sizes)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices[:used])
    except Exception:  # noqa: BLE001 - topology-aware layout is best effort
        grid = np.asarray(devices[:used], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_cfg: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` from ``cfg.mesh`` (fields ``data``, ``fsdp``, ``tensor``)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


@contextmanager
def mesh_context(mesh: Mesh, rules: Rules):
    """Trace and run under ``mesh`` with ``rules``: flax's ``with_logical_constraint`` in the
    decoder becomes a sharding constraint (it is a no-op outside this context)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


# ----------------------------------------------------------------------------- rules
def rules_from_config(rules: Iterable[Sequence[Any]]) -> Rules:
    """Normalise ``cfg.mesh.rules`` (lists/tuples from a config file) to flax's rule tuple.

    Each entry is ``(logical name, mesh axis | tuple of mesh axes | None)``; mesh axes must be
    among ``data, fsdp, tensor`` and ``lora_r`` may not be sharded.
    """
    out = []
    for entry in rules:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise ShardingError(f"mesh.rules: entry {entry!r} is not (logical name, mesh axes)")
        name, axes = entry
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes) if len(axes) > 1 else (axes[0] if axes else None)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ShardingError(f"mesh.rules: {name!r} -> {a!r} is not a mesh axis "
                                    f"({', '.join(MESH_AXES)})")
        if name in NEVER_SHARDED and axes is not None:
            raise ShardingError(f"mesh.rules: {name!r} must map to None (a LoRA rank is never "
                                f"sharded), got {axes!r}")
        out.append((name, axes))
    return tuple(out)


def check_rules(rules: Rules, names: Iterable[str | None], *, where: str = "mesh.rules"
                ) -> None:
    """Refuse logical names without a rule (flax would silently replicate them)."""
    known = {n for n, _ in rules}
    missing = sorted({n for n in names if n is not None and n not in known})
    if missing:
        raise ShardingError(f"{where}: no rule for logical axis name(s) {', '.join(missing)}; "
                            f"add (name, mesh axes or None) to cfg.mesh.rules")


def default_rule_names() -> tuple[str, ...]:
    """Every logical name the model, the decoder's activations and the networks use."""
    return tuple(dict.fromkeys(MODEL_PARAM_AXES + MODEL_ACTIVATION_AXES + FUSION_AXES))


def _axes_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, tuple) else (axes,)


def _fit(axes: Any, size: int, mesh_shape: Mapping[str, int]) -> Any:
    """The longest prefix of ``axes`` whose device product divides ``size``."""
    ax = _axes_tuple(axes)
    while ax and size % math.prod(mesh_shape[a] for a in ax):
        ax = ax[:-1]
    if not ax:
        return None
    return ax[0] if len(ax) == 1 else ax


def rules_for_batch(rules: Rules, mesh: Mesh, batch_size: int) -> Rules:
    """``rules`` with the ``batch`` rule trimmed to mesh axes that divide ``batch_size``."""
    shape = dict(mesh.shape)
    return tuple((n, _fit(a, batch_size, shape) if n == "batch" else a) for n, a in rules)


def logical_to_mesh_spec(logical: PartitionSpec | Sequence[str | None], rules: Rules,
                         shape: Sequence[int] | None = None,
                         mesh: Mesh | None = None) -> PartitionSpec:
    """Mesh `PartitionSpec` of one array from its logical spec (fitted to ``shape`` when the
    shape and mesh are given)."""
    logical = tuple(logical)
    check_rules(rules, logical)
    spec = list(nn.logical_to_mesh_axes(logical, rules))
    spec += [None] * (len(logical) - len(spec))
    for name, axes in zip(logical, spec, strict=True):
        if name in NEVER_SHARDED and axes is not None:
            raise ShardingError(f"logical axis {name!r} would be sharded over {axes!r}")
    if mesh is not None:
        mshape = dict(mesh.shape)
        if shape is not None:
            spec = [_fit(a, s, mshape) for a, s in zip(spec, shape, strict=True)]
        spec = [_drop_trivial(a, mshape) for a in spec]
    # Canonical form (the one jit gives its outputs): no size-1 mesh axes, no trailing None,
    # so that a step's output state has exactly its input's sharding (no recompilation).
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _drop_trivial(axes: Any, mesh_shape: Mapping[str, int]) -> Any:
    ax = tuple(a for a in _axes_tuple(axes) if mesh_shape[a] > 1)
    return None if not ax else (ax[0] if len(ax) == 1 else ax)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def logical_to_named(spec_tree: Any, mesh: Mesh, rules: Rules, shapes: Any = None) -> Any:
    """A tree of logical `PartitionSpec`s -> a tree of `NamedSharding`s on ``mesh``.

    ``shapes`` (optional): a tree of the same structure whose leaves have ``.shape``; each
    dimension is then fitted (see module docstring).
    """
    if shapes is None:
        return jax.tree.map(
            lambda s: NamedSharding(mesh, logical_to_mesh_spec(s, rules, mesh=mesh)),
            spec_tree, is_leaf=_is_spec)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, logical_to_mesh_spec(s, rules, np.shape(x), mesh)),
        spec_tree, shapes, is_leaf=_is_spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------- placement
def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place one array (numpy or jax) into ``sharding``; multi-host correct for host data."""
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if x.is_fully_addressable:
            return jax.device_put(x, sharding)
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    arr = np.asarray(x)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def put_tree(tree: Any, shardings: Any) -> Any:
    """`put` over a tree (``shardings`` a tree of the same structure, or one sharding)."""
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: put(x, shardings), tree)
    return jax.tree.map(put, tree, shardings)


def shard_params(tree: Any, logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Place ``tree`` by its logical specs (a same-structured tree of `PartitionSpec`s)."""
    return put_tree(tree, logical_to_named(logical_specs, mesh, rules, shapes=tree))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 3, batch_dim: int = 1
                   ) -> NamedSharding:
    """Sharding of a stacked micro-batch array (``(accum, B, L)``: the ``batch`` dim is 1)."""
    logical = [None] * ndim
    logical[batch_dim] = "batch"
    return NamedSharding(mesh, logical_to_mesh_spec(logical, rules, mesh=mesh))


# ----------------------------------------------------------------------------- fusion
def _fusion_name(name: str | None) -> str | None:
    if name is None or name in _FUSION_KEEP or name.startswith("fusion_"):
        return name
    return "fusion_" + name


def fusion_logical_specs(boxed: Any) -> Any:
    """Logical specs of ``init_fusion_params(..., boxed=True)`` (or its ``eval_shape``), with
    the networks' names namespaced (``embed`` -> ``fusion_embed``; ``block``, ``lora_r``
    kept). Unboxed leaves (the α scalars) get ``PartitionSpec()`` (replicated)."""
    specs = nn.get_partition_spec(boxed)
    return jax.tree.map(lambda s: PartitionSpec(*(_fusion_name(n) for n in s)), specs,
                        is_leaf=_is_spec)


def packed_specs(specs: Any, plan: Any) -> Any:
    """`fusion_logical_specs` of a ``{"nets", "alpha"}`` tree, laid out as
    `hfjax.fusion.network.pack_nets` packs the parameters (``{"clusters", "alpha"}``): a
    stacked cluster's leaves get an unsharded leading axis."""
    from hfjax.fusion.network import cluster_key, group_clusters

    clusters = {}
    for cluster in group_clusters(plan):
        tree = specs["nets"][cluster[0].name]
        if len(cluster) > 1:
            tree = jax.tree.map(lambda s: PartitionSpec(None, *s), tree, is_leaf=_is_spec)
        clusters[cluster_key(cluster)] = tree
    return {"clusters": clusters, "alpha": specs["alpha"]}


def context_specs(contexts: Any) -> Any:
    """Logical specs of block contexts: ``tgt``/``src`` ``(modules, tokens, block)``,
    ``tgt_s``/``src_s`` ``(modules, tokens, lora_r)``."""
    def spec(path: tuple[Any, ...], x: Any) -> PartitionSpec:
        key = getattr(path[-1], "key", None)
        last = "lora_r" if key in ("tgt_s", "src_s") else "block"
        return PartitionSpec(*([None] * (np.ndim(x) - 2)), "tokens", last)

    return jax.tree_util.tree_map_with_path(spec, contexts)


def opt_state_shardings(optimizer: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of ``optimizer.init(params)``: every parameter-shaped leaf (AdamW's moments)
    as its parameter, everything else (step counts) replicated. ``params`` may be abstract."""
    import optax

    state_shape = jax.eval_shape(optimizer.init, params)
    rep = replicated(mesh)
    return optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, state_shape, param_shardings,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding))


# ----------------------------------------------------------------------------- inspection
def describe(tree: Any) -> dict[str, str]:
    """``{path: "shape spec"}`` of a placed tree (for logs and tests)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        out[jax.tree_util.keystr(path)] = f"{tuple(np.shape(x))} {spec}"
    return out


def bytes_per_device(tree: Any) -> int:
    """Bytes of ``tree`` held by the first device (its shard of every leaf)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            shard = x.addressable_shards[0].data
            total += shard.size * shard.dtype.itemsize
        else:
            total += np.asarray(x).nbytes
    return total


# ----------------------------------------------------------------------------- multi-host
_CLUSTER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _int(v: str | None) -> int:
    try:
        return int(v) if v else 1
    except ValueError:
        return 1


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Start JAX's multi-process runtime when the environment asks for it (see the module
    docstring); returns whether it is (now) initialised. Call before any other JAX call."""
    env = os.environ if env is None else env
    flag = env.get("HFJAX_DISTRIBUTED", "").strip()
    if flag == "0":
        return False
    if jax.distributed.is_initialized():
        return True
    addr, n, pid = (env.get("JAX_COORDINATOR_ADDRESS"), env.get("JAX_NUM_PROCESSES"),
                    env.get("JAX_PROCESS_ID"))
    if addr and n and pid:
        jax.distributed.initialize(coordinator_address=addr, num_processes=int(n),
                                   process_id=int(pid))
        return True
    cluster = any(_int(env.get(v)) > 1 for v in _CLUSTER_VARS)
    if flag == "1" or cluster:
        jax.distributed.initialize()  # JAX detects SLURM / Open MPI / K8s / TPU settings
        return True
    return False


__all__ = [
    "FUSION_AXES",
    "MESH_AXES",
    "MODEL_ACTIVATION_AXES",
    "MODEL_PARAM_AXES",
    "ShardingError",
    "batch_sharding",
    "bytes_per_device",
    "check_rules",
    "context_specs",
    "default_rule_names",
    "describe",
    "fusion_logical_specs",
    "packed_specs",
    "logical_to_mesh_spec",
    "logical_to_named",
    "make_mesh",
    "maybe_initialize_distributed",
    "mesh_context",
    "mesh_from_config",
    "opt_state_shardings",
    "put",
    "put_tree",
    "replicated",
    "rules_for_batch",
    "rules_from_config",
    "shard_params",
]
