"""Multi-host on one machine: 2 JAX processes x 4 CPU devices, gloo collectives over 127.0.0.1.

Both processes run `_child` (this module, imported in a subprocess) with the environment a
real cluster launch sets (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``: `hfjax.sharding.maybe_initialize_distributed` reads them). The mesh
``data=1, fsdp=4, tensor=2`` spans both processes (fsdp over the process boundary), so each
process holds, and reads from disk, half of the base model. Process 1 runs with umask 077 and
process 0 with 022: a shared output without group/other read bits was written by process 1.
Slow (marked): about 2 minutes of CPU on 2 cores for the pair, plus the zoo and the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
N_PROC, LOCAL_DEVICES = 2, 4
MESH = (1, 4, 2)  # data, fsdp, tensor
STEPS, STOP_AFTER = 4, 2
TIMEOUT = 600


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _gloo_available(),
                                reason="this jaxlib has no gloo CPU collectives "
                                       "(multi-process CPU runs need them)")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(paths_json: str, out: str, mesh: tuple[int, int, int]):
    from hfjax.testing.zoo import tiny_fuse_config

    paths = {k: Path(v) for k, v in json.loads(Path(paths_json).read_text()).items()}
    cfg = tiny_fuse_config(paths, Path(out))
    cfg.train.batch_size = 4
    cfg.train.grad_accum = 2
    cfg.train.max_steps = STEPS
    cfg.train.checkpoint_every = 2
    cfg.data.cutoff_len = cfg.data.min_bucket = 96  # one padded length: one SPMD compile
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    return cfg


# ----------------------------------------------------------------------------- parent side
@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    from bridge import save_adapter
    from hfjax.models.config import ModelConfig
    from hfjax.testing.models import random_lora
    from hfjax.testing.zoo import build_zoo

    root = tmp_path_factory.mktemp("mh_zoo")
    paths = build_zoo(root)
    # One fused group (q_proj) keeps the SPMD compiles short.
    llama = ModelConfig.from_hf(paths["base_llama"])
    paths["target_adapter"] = save_adapter(
        random_lora(llama, r=4, alpha=8, seed=10, target_modules=("q_proj",)),
        root / "lora_llama_q")
    out = root / "paths.json"
    out.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return out


@pytest.fixture(scope="module")
def two_processes(zoo, tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("mh_out")
    port = _free_port()
    procs = []
    t0 = time.time()
    for pid in range(N_PROC):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "JAX_NUM_PROCESSES": str(N_PROC), "JAX_PROCESS_ID": str(pid),
               "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT),
                                              os.environ.get("PYTHONPATH", "")])}
        code = "import test_multihost as t, sys; t._child(*sys.argv[1:])"
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code, str(zoo), str(out)], env=env, cwd=str(ROOT),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            umask=0o022 if pid == 0 else 0o077))
    results = []
    try:
        for pid, p in enumerate(procs):
            stdout, stderr = p.communicate(timeout=TIMEOUT)
            if p.returncode != 0:
                raise AssertionError(f"process {pid} failed (rc {p.returncode}):\n"
                                     f"{stdout[-3000:]}\n{stderr[-6000:]}")
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"out": out, "procs": results, "wall_s": round(time.time() - t0, 1)}


@pytest.fixture(scope="module")
def single_process(zoo, tmp_path_factory):
    """The same job in this (one-device) process: the reference export."""
    from hfjax.training.fuse_loop import run_fusion

    cfg = _cfg(str(zoo), str(tmp_path_factory.mktemp("sp_out")), (1, 1, 1))
    return run_fusion(cfg, progress=False)


def test_step_under_two_process_mesh_equals_single_device(two_processes):
    for r in two_processes["procs"]:
        assert r["process_count"] == N_PROC and r["device_count"] == N_PROC * LOCAL_DEVICES
        assert r["loss_diff"] <= 1e-5 and r["param_diff"] <= 1e-5, r


def test_each_process_loads_only_its_shards(two_processes):
    procs = two_processes["procs"]
    total = procs[0]["checkpoint_bytes"]
    for r in procs:
        # fsdp spans the two processes: each holds and reads half of every fsdp-sharded
        # tensor (norms and other replicated tensors in full).
        assert r["bytes_read"] == r["addressable_bytes"], r
        assert r["bytes_read"] < 0.6 * total, r
    assert procs[0]["bytes_read"] + procs[1]["bytes_read"] < 1.2 * total


def test_fuse_checkpoints_resume_and_export_match_single_process(two_processes,
                                                                 single_process):
    from bridge import load_adapter

    p0, p1 = two_processes["procs"]
    for r in (p0, p1):
        assert r["first_call_steps"] == STOP_AFTER and r["resumed_from_step"] == STOP_AFTER, r
        assert r["steps"] == STEPS and r["checkpoints"] == [2, 4], r
        assert r["compilations"] == [0, 0], r  # the run reused the step compiled above
    task = two_processes["out"] / "tiny"
    ours = load_adapter(task / "merged_lora")
    ref = load_adapter(single_process.adapter_dir)
    assert list(ours.modules) == list(ref.modules)
    assert ours.config == ref.config
    for name, m in ref.modules.items():
        np.testing.assert_array_equal(ours.modules[name].A, m.A)
        assert ours.modules[name].B.shape == m.B.shape
    diff = max(float(np.max(np.abs(ours.modules[n].B - ref.modules[n].B))) for n in ref.modules)
    target = load_adapter(single_process.report["target_adapter"])
    moved = max(float(np.max(np.abs(ref.modules[n].B - target.modules[n].B)))
                for n in ref.modules)  # fusion changed the B's (the comparison is not vacuous)
    assert diff <= 1e-5 and moved > 1e-4, (diff, moved)
    # the gathered B's were identical on both processes
    assert p0["fused_B_sha"] == p1["fused_B_sha"]
    report = json.loads((task / "fusion_report.json").read_text())
    assert report["run"]["resumed_from_step"] == STOP_AFTER
    for g, a in single_process.report["alpha"].items():
        assert abs(report["alpha"][g] - a) <= 1e-5


def test_only_process_zero_writes_shared_outputs(two_processes):
    task = two_processes["out"] / "tiny"
    lines = [json.loads(s) for s in (task / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, STEPS + 1))  # once each, one writer
    # Created under umask 022 (process 0), not 077 (process 1): group/other may read. The
    # merged_lora directory is built in a fresh directory renamed into place, so its mode
    # names the process that wrote all of it (safetensors files are 0600 whoever writes them).
    shared = [task / "metrics.jsonl", task / "fusion_report.json", task / "merged_lora",
              task / "merged_lora" / "adapter_config.json"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in shared}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in shared), modes


# ----------------------------------------------------------------------------- child side
def _tree_max_diff(a: Any, b: Any) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _addressable_bytes(tree: Any) -> int:
    """Bytes of the distinct shards this process holds (replicas on its devices counted once)."""
    total = 0
    for x in jax.tree.leaves(tree):
        seen = set()
        for s in x.addressable_shards:
            key = tuple((sl.start, sl.stop) for sl in s.index)
            if key not in seen:
                seen.add(key)
                total += s.data.nbytes
    return total


def _child(paths_json: str, out: str) -> None:
    import hashlib

    import jax.numpy as jnp

    from hfjax import distributed as dist
    from hfjax import sharding as shd

    assert shd.maybe_initialize_distributed()
    from hfjax.fusion import init_fusion_params
    from hfjax.fusion.network import pack_nets
    from hfjax.loading import from_pretrained
    from hfjax.training import fuse_step as fs
    from hfjax.training.checkpointing import Checkpointer
    from hfjax.training.data import length_buckets
    from hfjax.training.fuse_loop import (
        fused_factors_numpy,
        micro_batch_stream,
        prepare,
        run_fusion,
        stack_window,
        statics_from,
    )

    res: dict[str, Any] = {"process_count": jax.process_count(),
                           "device_count": jax.device_count()}
    cfg = _cfg(paths_json, out, MESH)
    inp = prepare(cfg)
    tr, f = cfg.train, cfg.fusion
    mesh = shd.mesh_from_config(cfg.mesh)
    rules = shd.rules_for_batch(shd.rules_from_config(cfg.mesh.rules), mesh, tr.batch_size)

    # ---- loading: only this process's shards are read
    stats: dict[str, int] = {}
    base = from_pretrained(cfg.target.model_path, dtype=jnp.float32, mesh=mesh, rules=rules,
                           stats=stats).params
    res["bytes_read"] = stats["bytes_read"]
    res["addressable_bytes"] = _addressable_bytes(base)
    res["checkpoint_bytes"] = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(base))

    # ---- one fused step: the two-process mesh vs this process's first device alone
    # the run's own statics, so that run_fusion below reuses this step's compilation
    st = statics_from(cfg, inp.plan, inp.model_cfg, steps=STEPS)
    opt = st.optimizer
    kw = dict(key=jax.random.PRNGKey(0), embed_dim=f.embed_dim, num_heads=f.num_heads,
              max_pos=f.max_pos, mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init)
    pad = inp.tokenizer.pad_token_id or 0
    stream = micro_batch_stream(inp.replay, batch_size=tr.batch_size, epochs=1, seed=0,
                                buckets=length_buckets(cfg.data.cutoff_len, cfg.data.min_bucket),
                                pad_id=pad)
    batch, weights = stack_window([next(stream) for _ in range(tr.grad_accum)], tr.grad_accum,
                                  tr.batch_size, pad)
    rdm_key = jax.random.PRNGKey(7)
    local = jax.local_devices()[0]

    def fresh_state() -> dict[str, Any]:  # in the loop's layout (networks packed)
        p = init_fusion_params(inp.plan, None, **kw)
        p = {"clusters": pack_nets(p["nets"], inp.plan), "alpha": p["alpha"]}
        return {"params": p, "opt_state": opt.init(p), "step": jnp.ones((), jnp.int32)}

    on_local = jax.device_put(
        ({"base": dist.gather_to_host(base), "adapter": inp.target.to_jax(jnp.float32),
          "contexts": inp.contexts}, batch, weights, fresh_state()), local)
    frozen1, b1, w1, s1 = on_local
    s1, m1 = fs.fuse_step(s1, frozen1, b1, w1, rdm_key, st=st)
    s1 = jax.device_get(s1)

    boxed = init_fusion_params(inp.plan, None, boxed=True, **kw)
    st0 = jax.device_get(fresh_state())
    param_sh = shd.logical_to_named(shd.packed_specs(shd.fusion_logical_specs(boxed), inp.plan),
                                    mesh, rules, shapes=st0["params"])
    state_sh = {"params": param_sh, "step": shd.replicated(mesh),
                "opt_state": shd.opt_state_shardings(opt, st0["params"], param_sh, mesh)}
    frozen = {"base": base, "adapter": shd.put_tree(jax.device_get(frozen1["adapter"]),
                                                    shd.replicated(mesh)),
              "contexts": shd.shard_params(inp.contexts, shd.context_specs(inp.contexts), mesh,
                                           rules)}
    with shd.mesh_context(mesh, rules):
        s8, m8 = fs.fuse_step(shd.put_tree(st0, state_sh), frozen,
                              shd.put_tree(batch, shd.batch_sharding(mesh, rules)),
                              shd.put(weights, shd.replicated(mesh)), rdm_key, st=st)
    res["loss_diff"] = abs(float(m1["loss"]) - float(m8["loss"]))
    res["param_diff"] = _tree_max_diff(s1["params"], dist.gather_to_host(s8["params"]))
    new_B = fused_factors_numpy(s8["params"], frozen, st)[0]["B"]
    res["fused_B_sha"] = hashlib.sha256(b"".join(
        np.ascontiguousarray(new_B[k]).tobytes() for k in sorted(new_B))).hexdigest()

    # ---- the whole job: interrupted after 2 steps (checkpointed), then resumed and exported
    first = run_fusion(cfg, progress=False, stop_after=STOP_AFTER)
    res["first_call_steps"] = first.steps
    final = run_fusion(cfg, progress=False)
    res["steps"] = final.steps
    res["compilations"] = [first.compilations, final.compilations]
    res["resumed_from_step"] = final.report["run"]["resumed_from_step"]
    res["checkpoints"] = sorted(Checkpointer(final.output_dir / "checkpoints")._mngr.all_steps())
    print(json.dumps(res))
