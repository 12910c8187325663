"""`hfjax study` on the tiny zoo: every row end to end, controls, tuned target, stats, resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from bridge import load_adapter, save_adapter
from hfjax.models.config import ModelConfig
from hfjax.study import EvalOptions, StudyError, bootstrap, parse_eval_data, run_study, verdict
from hfjax.study.plan import DEFAULT_ROWS, make_plan, select_rows
from hfjax.testing import tasks
from hfjax.testing.models import random_lora
from hfjax.testing.zoo import QKV, tiny_fuse_config

SEEDS = (0, 1)
OPTS = EvalOptions(batch_size=4, max_new_tokens=6, limit=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("study_inputs")
    zoo = tiny_zoo()  # q/v sources, a q/k/v target, 8 replay examples a file
    llama = ModelConfig.from_hf(zoo["base_llama"])
    zoo["llama_b"] = save_adapter(random_lora(llama, r=4, alpha=8, seed=13, target_modules=QKV),
                                  root / "lora_b")
    split = tasks.make_splits("movie", n_train=0, n_replay=0, n_test=4, seed=5)
    tasks.write_task_files(root / "test", {"movie": {"test": split["test"]}})
    cfg = tiny_fuse_config(zoo, root / "unused")
    cfg.sources = ({"name": "qwen", "adapter_path": str(zoo["qwen_adapter"])},
                   {"name": "llama_b", "adapter_path": str(zoo["llama_b"])})
    cfg.train.max_steps = 2
    return zoo, cfg, {"movie": str(root / "test" / "movie_test.json")}


@pytest.fixture(scope="module")
def study(setup, tmp_path_factory):
    zoo, cfg, eval_data = setup
    out = tmp_path_factory.mktemp("study")
    return out, run_study(cfg, eval_data, seeds=SEEDS, out_dir=out, progress=False,
                          eval_options=OPTS)


def expected_rows(cfg) -> set[str]:
    rows = {r.name for r in DEFAULT_ROWS} | {"project_llama_b"}
    if "source_control" not in cfg.fusion:  # the field is added by another change
        rows -= {"noise_sources", "mismatch_sources"}
    return rows


def test_fast_study_runs_every_row(setup, study):
    _, cfg, _ = setup
    out, s = study
    assert set(s["rows"]) == expected_rows(cfg)
    if "source_control" not in cfg.fusion:
        assert "fusion.source_control" in s["skipped"]["noise_sources"]
    assert "project_qwen" in s["skipped"]  # another family: no homogeneous projection
    for name, row in s["rows"].items():
        seeds = row["seeds"]
        assert seeds == ([None] if name in ("base", "target", "merge_linear", "merge_ties",
                                            "merge_magnitude_prune", "project_llama_b")
                         else list(SEEDS)), name
        for per_task in row["predictions"].values():
            assert all(json.loads(line) for line in
                       open(out / per_task["movie"]).read().splitlines())
        avg = row["scores"]["f1"]["avg"]
        assert avg["lo"] <= avg["value"] <= avg["hi"]
    pairs = {(c["a"], c["b"]) for c in s["comparisons"]}
    assert {("fused", "zero_sources"), ("fused", "tuned_target"), ("fused", "target")} <= pairs
    assert any(b.startswith(("merge_", "project_")) for a, b in pairs)
    md = (out / "study.md").read_text()
    assert "## Verdicts" in md and "type-only micro F1" in md and "hierarchical" in md
    assert s["rows"]["fused"]["adapters"]["0"] != s["rows"]["zero_sources"]["adapters"]["0"]
    fused = load_adapter(out / s["rows"]["fused"]["adapters"]["0"]).modules
    zero = load_adapter(out / s["rows"]["zero_sources"]["adapters"]["0"]).modules
    assert any(not np.allclose(fused[n].B, zero[n].B) for n in fused)  # the control differs
    assert json.loads((out / "study.json").read_text())["comparisons"]
    for seed in map(str, SEEDS):  # the probe ran on every fused run's trained networks
        probe = {r["perturbation"]: r for r in s["rows"]["fused"]["train"][seed]["probe"]
                 if r["group"] == "all"}
        assert {"zero", "noise", "roll"} <= set(probe)
        assert all(np.isfinite(r["nll"]) and r["dB_fro"] > 0 for r in probe.values())
        assert probe["zero"]["rel_dB_change"] > 0
    assert "## Does the fused network read its sources? (probe)" in md


def test_tuned_target_uses_fused_replay_and_steps(setup, study):
    zoo, cfg, _ = setup
    out, s = study
    target = load_adapter(zoo["target_adapter"])
    for seed in map(str, SEEDS):
        fused, tuned = s["rows"]["fused"]["train"][seed], s["rows"]["tuned_target"]["train"][seed]
        assert tuned["steps"] == fused["steps"] == 2
        assert tuned["replay"] == fused["replay"]
        assert tuned["replay"]["datasets"] == list(cfg.data.datasets)
        assert tuned["init_adapter"] == str(zoo["target_adapter"])
        ada = load_adapter(out / s["rows"]["tuned_target"]["adapters"][seed])
        for name, m in target.modules.items():  # started from the target, then moved a bit
            diff = np.abs(ada.modules[name].B - m.B).max()
            assert 0 < diff < np.abs(m.B).max(), name


def test_stats_widen_when_seeds_disagree():
    rng = np.random.default_rng(0)
    right = (rng.random(60) < 0.7).astype(np.int64)
    agree = np.stack([np.stack([right, np.ones(60, np.int64)], -1)] * 3)
    wrong = (rng.random(60) < 0.2).astype(np.int64)
    disagree = agree.copy()
    disagree[1, :, 0] = wrong
    disagree[2, :, 0] = 1
    base = np.stack([np.stack([np.zeros(60, np.int64), np.ones(60, np.int64)], -1)])
    a = bootstrap({"t": agree}, None, "accuracy")
    d = bootstrap({"t": disagree}, None, "accuracy")
    assert d["hi"] - d["lo"] > 1.5 * (a["hi"] - a["lo"])
    da = bootstrap({"t": agree}, {"t": base}, "accuracy")
    dd = bootstrap({"t": disagree}, {"t": base}, "accuracy")
    assert dd["hi"] - dd["lo"] > 1.5 * (da["hi"] - da["lo"])
    assert da["diff"] == pytest.approx(100 * right.mean())


def test_verdict_wording():
    gain = verdict({"diff": 5.0, "lo": 1.2, "hi": 8.9}, "fused", "noise sources")
    assert gain.startswith("gain: fused beats noise sources by +5.0 points")
    assert "[+1.2, +8.9]" in gain
    none = verdict({"diff": 1.0, "lo": -2.0, "hi": 4.0}, "fused", "tuned target")
    assert none.startswith("no difference shown") and "covers 0" in none
    assert verdict({"diff": -3, "lo": -5, "hi": -1}, "a", "b").startswith("loss: a trails b")
    counts = np.stack([np.stack([np.ones(40, np.int64), np.ones(40, np.int64)], -1)] * 2)
    zeros = counts.copy()
    zeros[..., 0] = 0
    assert verdict(bootstrap({"t": counts}, {"t": zeros}, "accuracy", pair_seeds=True),
                   "a", "b").startswith("gain")
    assert verdict(bootstrap({"t": counts}, {"t": counts}, "accuracy", pair_seeds=True),
                   "a", "b").startswith("no difference shown")


def test_resume_skips_finished_runs(setup, study):
    _, cfg, eval_data = setup
    out, first = study
    shutil.rmtree(out / "runs" / "zero_sources" / "seed1")
    s = run_study(cfg, eval_data, seeds=SEEDS, out_dir=out, rows="fused,zero_sources",
                  progress=False, eval_options=OPTS)
    resumed = {k: r["resumed"] for k, r in s["runs"].items()}
    assert resumed == {"fused/seed0": True, "fused/seed1": True, "zero_sources/seed0": True,
                       "zero_sources/seed1": False}
    assert s["rows"]["fused"]["scores"] == first["rows"]["fused"]["scores"]
    with pytest.raises(StudyError, match="other settings"):
        run_study(cfg, eval_data, seeds=SEEDS, out_dir=out, rows="fused", progress=False,
                  eval_options=EvalOptions(batch_size=4, max_new_tokens=7, limit=4))


def test_dry_run_lists_every_run(setup, tmp_path, capsys):
    _, cfg, eval_data = setup
    listing = run_study(cfg, eval_data, seeds=SEEDS, out_dir=tmp_path / "s", dry_run=True,
                        eval_options=OPTS)
    text = capsys.readouterr().out
    rows = select_rows(None, ["qwen", "llama_b"])
    runnable = [r for r in rows if r.name not in listing["skipped"]]
    keys = [u.key for u in make_plan(runnable, SEEDS)]
    assert [i["run"] for i in listing["plan"]] == keys
    assert len(keys) == 20 - 4 * ("source_control" not in cfg.fusion)
    for item in listing["plan"]:
        assert item["run"] in text
        trained = item["kind"] in ("fuse", "tune")
        assert item["updates"] == (2 if trained else 0)
        assert (item["train_tokens"] > 0) == trained and item["eval_tokens"] == 4 * 6
    assert "training tokens" in text and not (tmp_path / "s").exists()


def test_bad_input_is_one_line(setup, tmp_path):
    _, cfg, _ = setup
    with pytest.raises(StudyError, match="nope.json: no such test file"):
        run_study(cfg, {"movie": str(tmp_path / "nope.json")}, out_dir=tmp_path)
    with pytest.raises(StudyError, match="unknown row 'fuzed'"):
        run_study(cfg, parse_eval_data(f"movie={setup[2]['movie']}"), out_dir=tmp_path,
                  rows="fuzed", dry_run=True)
    assert parse_eval_data("a=x.json, b=y.json") == {"a": "x.json", "b": "y.json"}


def test_cli_study_dry_run(setup, tmp_path, capsys):
    from pathlib import Path

    from hfjax.cli import main

    zoo, cfg, eval_data = setup
    conf = Path(__file__).resolve().parents[1] / "configs" / "fuse.py"
    over = [f"--config.{k}={v}" for k, v in {
        "target.model_path": zoo["base_llama"], "target.adapter_path": zoo["target_adapter"],
        "sources": f"qwen={zoo['qwen_adapter']},llama_b={zoo['llama_b']}",
        "data.data_root": zoo["data"], "data.datasets": "movie_replay,relation_replay",
        "data.cutoff_len": 160, "train.max_steps": 2, "train.batch_size": 2}.items()]
    rc = main(["study", "--config", str(conf), "--eval_data", f"movie={eval_data['movie']}",
               "--seeds", "0,1", "--rows", "fused,tuned_target,merge_ties", "--out",
               str(tmp_path / "s"), "--dry_run", "--max_new_tokens", "6", *over])
    text = capsys.readouterr().out
    assert rc == 0
    for key in ("fused/seed0", "fused/seed1", "tuned_target/seed1", "merge_ties/once"):
        assert key in text
    assert main(["study", "--config", str(conf), "--eval_data", "movie", "--out",
                 str(tmp_path), *over]) == 2


def test_train_lora_init_adapter_refuses_bad_adapters(setup, tmp_path):
    from hfjax.configs.train_lora import get_config

    from hfjax.training.lora_train import ConfigError, train_lora, validate_train_config

    zoo, _, _ = setup
    cfg = get_config()
    cfg.model_path, cfg.data_root = str(zoo["base_llama"]), str(zoo["data"])
    cfg.datasets, cfg.output_dir = ("movie_replay",), str(tmp_path)
    cfg.init_adapter = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="init_adapter=.*no such adapter directory"):
        validate_train_config(cfg)
    cfg.init_adapter = str(zoo["qwen_adapter"])  # another family's adapter
    with pytest.raises(ConfigError, match="init_adapter"):
        train_lora(cfg, progress=False)


def test_exact_match_metric():
    from hfjax.eval.metrics import exact_match

    assert exact_match(["  yes<|eot_id|>", "no"], ["yes", "maybe"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="1 predictions for 2"):
        exact_match(["a"], ["a", "b"])
