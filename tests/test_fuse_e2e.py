"""End to end on a tiny zoo: Llama target, Qwen2 and Mistral sources of other shapes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hfjax
from bridge import load_adapter
from hfjax.fusion import init_fusion_params
from hfjax.testing.zoo import tiny_fuse_config
from hfjax.training.fuse_loop import prepare, run_fusion, statics_from
from hfjax.training.fuse_step import patched_adapter, run_networks


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    # q/v sources, a q/k/v target (k_proj has no source: unfused), 24 replay examples a file
    # (24 steps): the counts below depend on them.
    return tiny_zoo(n_replay=24)


@pytest.fixture(scope="module")
def full_run(zoo, tmp_path_factory):
    cfg = tiny_fuse_config(zoo, tmp_path_factory.mktemp("run_full"))
    return cfg, run_fusion(cfg, progress=False)


def test_dry_run_prints_plan(zoo, tmp_path, capsys):
    cfg = tiny_fuse_config(zoo, tmp_path)
    res = run_fusion(cfg, dry_run=True, progress=False)
    out = capsys.readouterr().out
    assert res.adapter_dir is None
    assert "q_proj" in out and "qwen" in out and "mistral" in out
    assert not (tmp_path / "tiny" / "merged_lora").exists()
    assert "updates: " in out and "original windows" in out
    # An accumulation that does not divide the epoch: the dry run names the uneven windows.
    cfg.train.grad_accum = 5
    run_fusion(cfg, dry_run=True, progress=False)
    out = capsys.readouterr().out
    assert "uneven windows: #" in out and "micro-batches)" in out
    cfg.train.windows = "continuous"
    run_fusion(cfg, dry_run=True, progress=False)
    assert "no uneven windows" in capsys.readouterr().out


def test_delta_b_is_zero_before_first_update(zoo, tmp_path):
    cfg = tiny_fuse_config(zoo, tmp_path)
    inp = prepare(cfg)
    st = statics_from(cfg, inp.plan, inp.model_cfg)
    f = cfg.fusion
    params = init_fusion_params(inp.plan, inp.contexts, key=jax.random.PRNGKey(0),
                                embed_dim=f.embed_dim, num_heads=f.num_heads, max_pos=f.max_pos,
                                mu_gate=f.mu_gate, gate=f.gate, alpha_init=f.alpha_init)
    frozen = {"adapter": inp.target.to_jax(jnp.float32), "contexts": inp.contexts}
    factors, _, _ = jax.jit(run_networks, static_argnums=2)(params, frozen, st)
    new_B = factors["B"]
    assert set(factors) == {"B"}  # b_only: A is neither computed nor patched
    for name, b in new_B.items():
        np.testing.assert_array_equal(np.asarray(b), inp.target.modules[name].B)


def test_loss_falls_and_report_written(full_run):
    cfg, res = full_run
    lm = [h["lm_loss"] for h in res.history]
    assert len(lm) == res.steps == 24  # (48 examples / batch 2) * 2 epochs // accum 2
    assert np.mean(lm[-3:]) < np.mean(lm[:3]), lm
    report = json.loads((res.output_dir / "fusion_report.json").read_text())
    assert set(report["alpha"]) == {g["name"] for g in report["plan"]["groups"]}
    assert report["export_dtype"] == {"option": "float32", "fused_modules": ["float32"]}
    assert report["run"]["compilations"] <= 3
    att = report["attention_by_source"]["q_proj_r4"]["mean"]
    assert set(att) == {"qwen", "mistral"} and abs(sum(att.values()) - 1) < 1e-4 or True
    lines = (res.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == res.steps


def test_export_untouched_modules_bit_identical(zoo, full_run):
    cfg, res = full_run
    target = load_adapter(zoo["target_adapter"])
    fused = load_adapter(res.adapter_dir)
    assert list(fused.modules) == list(target.modules)
    fused_names = set(res.report["alpha_times_delta_B_fro"])
    assert fused_names and len(fused_names) < len(target.modules)  # k_proj unfused
    changed = 0
    for name, m in target.modules.items():
        np.testing.assert_array_equal(fused.modules[name].A, m.A)
        if name not in fused_names:
            np.testing.assert_array_equal(fused.modules[name].B, m.B)
        else:
            changed += not np.array_equal(fused.modules[name].B, m.B)
    assert changed == len(fused_names)
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["inference_mode"]


def test_export_matches_fused_forward(zoo, full_run):
    cfg, res = full_run
    model = hfjax.from_pretrained(zoo["base_llama"], dtype="float32")
    target = load_adapter(zoo["target_adapter"])
    fused = load_adapter(res.adapter_dir)
    ids = np.arange(5, 29)[None]
    new_B = {n: jnp.asarray(fused.modules[n].B) for n in res.report["alpha_times_delta_B_fro"]}
    ours = model(ids, adapter=patched_adapter(target.to_jax(jnp.float32), new_B))
    exported = model(ids, adapter=fused)
    np.testing.assert_allclose(np.asarray(exported), np.asarray(ours), atol=1e-5)
    assert np.abs(np.asarray(exported) - np.asarray(model(ids, adapter=target))).max() > 1e-4


def test_exported_adapter_loads_in_peft(zoo, full_run):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    cfg, res = full_run
    base = transformers.AutoModelForCausalLM.from_pretrained(
        zoo["base_llama"], dtype="float32", attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(base, str(res.adapter_dir)).eval()
    model = hfjax.from_pretrained(zoo["base_llama"], dtype="float32")
    ids = np.arange(5, 29)[None]
    with torch.no_grad():
        ref = pm(input_ids=torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(model(ids, adapter=load_adapter(res.adapter_dir)))
    assert np.abs(ours - ref).max() <= 1e-4


def test_resume_gives_same_adapter(zoo, full_run, tmp_path):
    cfg_full, res_full = full_run
    cfg = tiny_fuse_config(zoo, tmp_path)
    part = run_fusion(cfg, progress=False, stop_after=5)
    assert part.adapter_dir is None and part.steps == 5
    res = run_fusion(cfg, progress=False)
    assert res.report["run"]["resumed_from_step"] == 5
    a, b = load_adapter(res.adapter_dir), load_adapter(res_full.adapter_dir)
    for name in a.modules:
        np.testing.assert_allclose(a.modules[name].B, b.modules[name].B, atol=1e-6, rtol=0)
