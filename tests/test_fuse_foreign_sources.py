"""A Llama target fused from Gemma 2, OLMo 2 and Phi-3 experts (families hfjax cannot run)."""

from __future__ import annotations

import numpy as np
import pytest
from source_fixtures import BF16, write_config, write_expert

from bridge import load_adapter, save_adapter
from hfjax.testing import tasks
from hfjax.testing.models import build_base_model, random_lora
from hfjax.testing.tokenizer import train_tokenizer
from hfjax.testing.zoo import SMALL, tiny_fuse_config
from hfjax.training.fuse_loop import prepare, run_fusion


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    tok = train_tokenizer(tasks.pretraining_corpus(300, seed=0), "llama", 320, root / "tok")
    llama = build_base_model(root / "base_llama", SMALL["llama"], tok, seed=1)
    paths = {"base_llama": root / "base_llama",
             "target_adapter": save_adapter(random_lora(llama.config, r=4, alpha=8, seed=10),
                                            root / "lora_llama")}
    splits = {name: {"replay": tasks.make_splits(name, n_train=0, n_replay=8, n_test=0,
                                                 seed=3)["replay"]}
              for name in ("movie", "relation")}
    tasks.write_task_files(root / "data", splits)
    paths["data"] = root / "data"
    paths["gemma2"] = write_expert(root, "gemma2", seed=1, dtype=BF16)
    paths["olmo2"] = write_expert(root, "olmo2", seed=2, adapter_name="default")
    paths["phi3"] = write_expert(root, "phi3", seed=3)
    paths["phi3_config"] = write_config(root, "phi3")
    return paths


def config(zoo, out):
    cfg = tiny_fuse_config({"qwen_adapter": "", "mistral_adapter": "", **zoo}, out)
    cfg.sources = (
        {"name": "gemma2", "adapter_path": str(zoo["gemma2"])},
        {"name": "olmo2", "adapter_path": str(zoo["olmo2"])},
        {"name": "phi3", "adapter_path": str(zoo["phi3"]),
         "config_path": str(zoo["phi3_config"])},
    )
    cfg.train.epochs = 1
    cfg.train.max_steps = 3
    return cfg


def test_dry_run_shows_the_match_table(zoo, tmp_path, capsys):
    res = run_fusion(config(zoo, tmp_path), dry_run=True, progress=False)
    out = capsys.readouterr().out
    assert res.adapter_dir is None
    for line in (
        "[0] gemma2 (3 layers, 21 modules; 21 matched):",
        "0..2           self_attn.q_proj  -> layers 1..3 self_attn.q_proj [q_proj_r4]",
        "[1] olmo2 (5 layers, 35 modules; 28 matched):",
        "0              every module (7 types)  -x no target layer: tail alignment pairs source "
        "layers 1..4 with target layers 0..3",
        "[2] phi3 (6 layers, 42 modules; 30 from splitting 12 fused; 28 matched):",
        "2..5           self_attn.k_proj (self_attn.qkv_proj rows 16:24)  -> layers 0..3 "
        "self_attn.k_proj [k_proj_r4]",
        "2..5           mlp.up_proj (mlp.gate_up_proj rows 40:80)         -> layers 0..3 "
        "mlp.up_proj [up_proj_r4]",
    ):
        assert line in out, (line, out)
    rep = res.report["plan"]
    assert {r["status"] for r in rep["matches"] if r["source"] == 2} == {"matched", "unaligned"}


def test_fusion_run_uses_every_family(zoo, tmp_path):
    cfg = config(zoo, tmp_path)
    inp = prepare(cfg)
    q = inp.plan.group("q_proj_r4")
    top = q.modules[-1]  # target layer 3: all three sources reach it
    assert top.sources == ((0, "model.layers.2.self_attn.q_proj"),
                           (1, "model.layers.4.self_attn.q_proj"),
                           (2, "model.layers.5.self_attn.q_proj"))
    assert inp.sources[2].modules["model.layers.5.self_attn.q_proj"].origin.startswith(
        "self_attn.qkv_proj")
    first = q.modules[0]  # target layer 0: Gemma 2 (3 layers) does not reach it
    assert [k for k, _ in first.sources] == [1, 2]

    res = run_fusion(cfg, progress=False)
    assert res.steps == 3 and all(np.isfinite(h["lm_loss"]) for h in res.history)
    target, fused = load_adapter(zoo["target_adapter"]), load_adapter(res.adapter_dir)
    assert list(fused.modules) == list(target.modules)
    names = set(res.report["alpha_times_delta_B_fro"])
    assert names == set(inp.plan.fused_modules) == set(target.modules)  # all 28 reached
    changed = [n for n in names if not np.array_equal(fused.modules[n].B, target.modules[n].B)]
    assert changed, "the fused adapter equals the target"
    share = res.report["attention_by_source"]["k_proj_r4"]["mean"]
    assert set(share) == {"gemma2", "olmo2", "phi3"}
