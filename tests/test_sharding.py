"""Sharding: rules, meshes, and the fused training step / whole fuse job on 8 simulated devices.

The multi-device checks run in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count
=8`` must be set before JAX starts, and this pytest process has already started it): the
child imports this module and calls one ``_child_*`` function, which asserts and prints JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from hfjax import sharding as shd

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
N_DEVICES = 8


# ----------------------------------------------------------------------------- in-process
def _default_rules() -> shd.Rules:
    from hfjax.configs.fuse import get_config

    return shd.rules_from_config(get_config().mesh.rules)


def _mesh_shape(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), shd.MESH_AXES)


def test_default_rules_cover_every_logical_name():
    from hfjax.models.key_tables import logical_axes_tree
    from hfjax.testing.models import DEFAULT_SHAPES, model_config

    rules = _default_rules()
    shd.check_rules(rules, shd.default_rule_names())

    class _Tok:  # model_config only needs ids and a length
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 10

    cfg = model_config(DEFAULT_SHAPES["qwen2"], _Tok())  # has q/k/v biases
    names = {n for s in jax.tree.leaves(logical_axes_tree(cfg),
                                        is_leaf=lambda x: isinstance(x, PartitionSpec))
             for n in s}
    assert names <= set(shd.MODEL_PARAM_AXES)
    shd.check_rules(rules, names)


def test_fusion_specs_are_namespaced_and_covered():
    from flax import linen as nn

    from hfjax.fusion import init_fusion_params
    from hfjax.fusion.plan import build_plan
    from hfjax.testing.models import DEFAULT_SHAPES, model_config, random_lora

    class _Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 10

    cfg = model_config(DEFAULT_SHAPES["llama"], _Tok())
    tgt = random_lora(cfg, r=4, seed=0, target_modules=("q_proj", "down_proj"))
    src = random_lora(cfg, r=4, seed=1, target_modules=("q_proj", "down_proj"))
    plan = build_plan(tgt, [src], block_size=16)
    # Concrete (tiny) init: init_fusion_params caches a jitted init, so never eval_shape it.
    boxed = init_fusion_params(plan, None, key=jax.random.PRNGKey(0), embed_dim=32,
                               num_heads=4, max_pos=64, boxed=True)
    specs = shd.fusion_logical_specs(boxed)
    flat = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    names = {n for s in flat for n in s}
    assert "embed" not in names and "fusion_embed" in names and "block" in names
    rules = _default_rules()
    shd.check_rules(rules, names)
    mesh = _mesh_shape(2, 2, 2)
    g = plan.groups[0].name
    shapes = nn.unbox(boxed)["nets"][g]
    row = specs["nets"][g]["encoder"]["proj_row"]["kernel"]
    assert tuple(row) == ("block", "fusion_embed")
    assert shd.logical_to_mesh_spec(row, rules, shapes["encoder"]["proj_row"]["kernel"].shape,
                                     mesh) == PartitionSpec(("fsdp", "tensor"))
    gate = specs["nets"][g]["encoder"]["gate_hidden"]["kernel"]
    assert gate[0] == "lora_r"
    assert shd.logical_to_mesh_spec(gate, rules, mesh=mesh) == PartitionSpec()
    assert specs["alpha"][g] == PartitionSpec()


def test_rules_refuse_bad_entries():
    with pytest.raises(shd.ShardingError, match="never"):
        shd.rules_from_config([("lora_r", "tensor")])
    with pytest.raises(shd.ShardingError, match="not a mesh axis"):
        shd.rules_from_config([("batch", "pipeline")])
    with pytest.raises(shd.ShardingError, match="no rule for logical axis name.*mlp"):
        shd.logical_to_mesh_spec(("embed", "mlp"), shd.rules_from_config([("embed", "fsdp")]))
    assert shd.rules_from_config([["batch", ["data", "fsdp"]], ["seq", []]]) == (
        ("batch", ("data", "fsdp")), ("seq", None))


def test_specs_fit_shapes_and_batch():
    rules = _default_rules()
    mesh = _mesh_shape(2, 2, 2)

    def spec(names, shape=None):
        return tuple(shd.logical_to_mesh_spec(names, rules, shape, mesh))

    assert spec(("embed", "q_heads"), (64, 32)) == ("fsdp", "tensor")
    # an odd dimension is replicated instead of failing to place
    assert spec(("embed", "q_heads"), (63, 32)) == (None, "tensor")
    # block over (fsdp, tensor): 6 divides by 2 only -> fsdp; trailing None dropped
    assert spec(("block", "fusion_embed"), (6, 8)) == ("fsdp",)
    # activations: batch takes data+fsdp first, so embed stays unsharded
    assert spec(("batch", "seq", "embed")) == (("data", "fsdp"),)
    # batch 2 on data 2 x fsdp 2 -> data only; batch 1 -> replicated, embed then takes fsdp
    assert dict(shd.rules_for_batch(rules, mesh, 2))["batch"] == "data"
    r1 = shd.rules_for_batch(rules, mesh, 1)
    assert dict(r1)["batch"] is None
    assert tuple(shd.logical_to_mesh_spec(("batch", "seq", "embed"), r1, mesh=mesh)) == \
        (None, None, "fsdp")
    # size-1 mesh axes are dropped (the canonical form jit outputs carry)
    one = _mesh_shape(2, 1, 1)
    assert tuple(shd.logical_to_mesh_spec(("embed", "q_heads"), rules, (4, 4), one)) == ()
    assert tuple(shd.logical_to_mesh_spec(("batch", "seq"), rules, (4, 8), one)) == ("data",)


def test_make_mesh_sizes():
    n = len(jax.devices())
    mesh = shd.make_mesh()
    assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(shd.ShardingError, match="does not divide"):
        shd.make_mesh(data=-1, fsdp=n + 1)
    with pytest.raises(shd.ShardingError, match="at most one -1"):
        shd.make_mesh(data=-1, fsdp=-1)


def test_maybe_initialize_distributed_is_a_noop_without_env():
    assert shd.maybe_initialize_distributed({}) is False
    assert shd.maybe_initialize_distributed({"HFJAX_DISTRIBUTED": "0",
                                             "JAX_COORDINATOR_ADDRESS": "x:1",
                                             "JAX_NUM_PROCESSES": "2",
                                             "JAX_PROCESS_ID": "0"}) is False
    assert shd.maybe_initialize_distributed({"SLURM_NTASKS": "1"}) is False


# ----------------------------------------------------------------------------- subprocesses
@pytest.fixture(scope="module")
def zoo_json(tmp_path_factory) -> Path:
    from bridge import save_adapter
    from hfjax.models.config import ModelConfig
    from hfjax.testing.models import random_lora
    from hfjax.testing.zoo import build_zoo

    root = tmp_path_factory.mktemp("shard_zoo")
    paths = build_zoo(root)
    # One group keeps the (8-device SPMD) compiles short: q_proj, fed by both sources, in
    # two buckets (layer 0 only reaches the Mistral source).
    llama = ModelConfig.from_hf(paths["base_llama"])
    paths["target_adapter"] = save_adapter(
        random_lora(llama, r=4, alpha=8, seed=10, target_modules=("q_proj",)),
        root / "lora_llama_q")
    out = root / "paths.json"
    out.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return out


def _run_child(func: str, *args: str, timeout: int = 900) -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
               [str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = f"import test_sharding as t, sys; t.{func}(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{func} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_step_on_2x2x2_mesh_equals_single_device(zoo_json):
    out = _run_child("_child_step", str(zoo_json))
    assert out["devices"] == N_DEVICES
    assert out["loss_diff"] <= 1e-5 and out["param_diff"] <= 1e-5, out
    assert out["compiles_per_bucket"] == 1, out


def test_run_fusion_on_mesh_equals_single_device(zoo_json, tmp_path):
    out = _run_child("_child_run", str(zoo_json), str(tmp_path))
    assert out["adapter_diff"] <= 1e-5, out
    assert out["mesh_compilations"] == out["buckets_seen"], out


# ----------------------------------------------------------------------------- child side
def _tree_max_diff(a: Any, b: Any) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _spec(x: jax.Array) -> tuple[Any, ...]:
    """A placed array's mesh spec with one entry per dimension."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _child_cfg(zoo_json: str, out: str = "/tmp/unused"):
    from hfjax.testing.zoo import tiny_fuse_config

    paths = {k: Path(v) for k, v in json.loads(Path(zoo_json).read_text()).items()}
    cfg = tiny_fuse_config(paths, Path(out))
    cfg.train.batch_size = 4  # divides data x fsdp = 4
    cfg.train.grad_accum = 2
    return cfg


def _child_step(zoo_json: str) -> None:
    """One fuse step: 2x2x2 mesh vs one device (plain, and with remat under the mesh)."""
    import jax.numpy as jnp
    from flax import linen as nn

    from hfjax.fusion import init_fusion_params
    from hfjax.loading import from_pretrained
    from hfjax.models.key_tables import logical_axes_tree
    from hfjax.training import fuse_step as fs
    from hfjax.training.data import length_buckets
    from hfjax.training.fuse_loop import micro_batch_stream, prepare, stack_window, statics_from

    assert len(jax.devices()) == N_DEVICES
    cfg = _child_cfg(zoo_json)
    inp = prepare(cfg)
    st = statics_from(cfg, inp.plan, inp.model_cfg, steps=10)
    opt = st.optimizer
    f, tr = cfg.fusion, cfg.train
    kw = dict(key=jax.random.PRNGKey(0), embed_dim=f.embed_dim, num_heads=f.num_heads,
              max_pos=f.max_pos, mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init)
    base = from_pretrained(cfg.target.model_path, dtype=jnp.float32).params
    adapter = inp.target.to_jax(jnp.float32)
    pad = inp.tokenizer.pad_token_id or 0
    stream = micro_batch_stream(inp.replay, batch_size=tr.batch_size, epochs=1, seed=0,
                                buckets=length_buckets(cfg.data.cutoff_len, cfg.data.min_bucket),
                                pad_id=pad)
    # One window, and the same window cut to a shorter bucket: two padded lengths.
    win = [next(stream) for _ in range(tr.grad_accum)]
    b, w = stack_window(win, tr.grad_accum, tr.batch_size, pad)
    short = length_buckets(cfg.data.cutoff_len, cfg.data.min_bucket)[0]
    assert short < b["input_ids"].shape[-1]
    windows = {b["input_ids"].shape[-1]: (b, w),
               short: ({k: np.ascontiguousarray(v[..., :short]) for k, v in b.items()}, w)}
    lengths = sorted(windows, reverse=True)
    rdm_key = jax.random.PRNGKey(7)

    def fresh_state() -> dict[str, Any]:
        # Warm the optimiser state with one update so that every parameter has moved
        # (decoder_out starts at zero; AdamW moments start at zero).
        p = init_fusion_params(inp.plan, None, **kw)
        return {"params": p, "opt_state": opt.init(p), "step": jnp.ones((), jnp.int32)}

    # ---- single device
    frozen1 = {"base": base, "adapter": adapter,
               "contexts": jax.tree.map(jnp.asarray, inp.contexts)}
    b0, w0 = windows[lengths[0]]
    s1, m1 = fs.fuse_step(fresh_state(), frozen1, b0, w0, rdm_key, st=st)
    s1, m1 = fs.fuse_step(s1, frozen1, b0, w0, rdm_key, st=st)

    # ---- 2 x 2 x 2 mesh
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    rules = shd.rules_for_batch(shd.rules_from_config(cfg.mesh.rules), mesh, tr.batch_size)
    boxed = init_fusion_params(inp.plan, None, boxed=True, **kw)
    logical = shd.fusion_logical_specs(boxed)
    param_sh = shd.logical_to_named(logical, mesh, rules, shapes=nn.unbox(boxed))
    st0 = fresh_state()
    state_sh = {"params": param_sh, "step": shd.replicated(mesh),
                "opt_state": shd.opt_state_shardings(opt, st0["params"], param_sh, mesh)}

    def placed_state() -> dict[str, Any]:
        return shd.put_tree(fresh_state(), state_sh)

    frozen = {"base": shd.shard_params(base, logical_axes_tree(inp.model_cfg), mesh, rules),
              "adapter": shd.put_tree(adapter, shd.replicated(mesh)),
              "contexts": shd.shard_params(inp.contexts, shd.context_specs(inp.contexts), mesh,
                                           rules)}
    data_sh = shd.batch_sharding(mesh, rules)

    def batch_on_mesh(length: int):
        b, w = windows[length]
        return shd.put_tree(b, data_sh), shd.put(w, shd.replicated(mesh))

    before = fs.fuse_step._cache_size()
    with shd.mesh_context(mesh, rules):
        s8, m8 = fs.fuse_step(placed_state(), frozen, *batch_on_mesh(lengths[0]), rdm_key, st=st)
        s8, m8 = fs.fuse_step(s8, frozen, *batch_on_mesh(lengths[0]), rdm_key, st=st)
        s8b, _ = fs.fuse_step(placed_state(), frozen, *batch_on_mesh(lengths[1]), rdm_key, st=st)
        s8b, _ = fs.fuse_step(s8b, frozen, *batch_on_mesh(lengths[1]), rdm_key, st=st)
    compiles = fs.fuse_step._cache_size() - before

    # Intended shardings, before and after the steps.
    g = inp.plan.groups[0].name
    q_kernel = frozen["base"]["layers"][0]["attn"]["q_proj"]["kernel"]
    down_kernel = frozen["base"]["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert _spec(q_kernel) == ("fsdp", "tensor"), q_kernel.sharding
    assert _spec(down_kernel) == ("tensor", "fsdp"), down_kernel.sharding
    for state in (placed_state(), s8, s8b):
        row = state["params"]["nets"][g]["encoder"]["proj_row"]["kernel"]
        out_k = state["params"]["nets"][g]["decoder_out"]["kernel"]
        assert _spec(row) == (("fsdp", "tensor"), None), row.sharding
        assert _spec(out_k) == (None, ("fsdp", "tensor")), out_k.sharding
        mu = state["opt_state"][0].mu["nets"][g]["encoder"]["proj_row"]["kernel"]
        assert _spec(mu) == _spec(row), mu.sharding
        for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh), strict=True):
            assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
    # No spec shards a LoRA rank axis: walk the logical specs of everything placed.
    placed = {"nets": (logical, s8["params"]),
              "contexts": (shd.context_specs(inp.contexts), frozen["contexts"])}
    n_rank_dims = 0
    for specs, arrays in placed.values():
        for spec, arr in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x,
                                                                            PartitionSpec)),
                             jax.tree.leaves(arrays), strict=True):
            for name, axes in zip(tuple(spec), _spec(arr), strict=False):
                if name == "lora_r":
                    n_rank_dims += 1
                    assert axes is None, (spec, arr.sharding)
    for mod in frozen["adapter"].values():
        assert mod["A"].sharding.spec == PartitionSpec() and mod["B"].sharding.is_fully_replicated
    assert n_rank_dims > 0

    # The memory plan's exact components equal what the mesh holds per device.
    from hfjax.memory import memory_plan

    mp = memory_plan(cfg, inp.model_cfg, inp.plan, {"data": 2, "fsdp": 2, "tensor": 2})["bytes"]
    held = {"base": frozen["base"], "networks": s8["params"]["nets"],
            "alphas": s8["params"]["alpha"], "adamw": s8["opt_state"],
            "contexts": frozen["contexts"], "target_adapter": frozen["adapter"]}
    for k, tree in held.items():
        assert mp[k] == shd.bytes_per_device(tree), (k, mp[k], shd.bytes_per_device(tree))
    assert mp["base"] < shd.bytes_per_device(base) / 3  # base really is split 4 ways

    print(json.dumps({
        "devices": len(jax.devices()),
        "loss_diff": abs(float(m1["loss"]) - float(m8["loss"])),
        "param_diff": _tree_max_diff(s1["params"], s8["params"]),
        "compiles_per_bucket": compiles / 2,
        "loss": float(m1["loss"]),
    }))


def _child_run(zoo_json: str, out: str) -> None:
    """The whole fuse job on the tiny zoo: 2x2x2 mesh (with remat) vs a one-device mesh."""
    from bridge import load_adapter
    from hfjax.training.fuse_loop import run_fusion

    assert len(jax.devices()) == N_DEVICES
    results = {}
    for name, sizes in (("single", (1, 1, 1)), ("mesh", (2, 2, 2))):
        cfg = _child_cfg(zoo_json, str(Path(out) / name))
        cfg.train.max_steps = 4
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
        cfg.train.remat = name == "mesh"  # rematerialised base forward under the mesh
        results[name] = run_fusion(cfg, progress=False)
    a = load_adapter(results["single"].adapter_dir)
    b = load_adapter(results["mesh"].adapter_dir)
    assert list(a.modules) == list(b.modules)
    diff = max(float(np.max(np.abs(a.modules[n].B - b.modules[n].B))) for n in a.modules)
    print(json.dumps({"adapter_diff": diff,
                      "mesh_compilations": results["mesh"].compilations,
                      "buckets_seen": results["single"].compilations,
                      "loss_single": results["single"].history[-1]["loss"],
                      "loss_mesh": results["mesh"].history[-1]["loss"]}))
