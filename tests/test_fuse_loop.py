"""The fusion loop's machinery: schedule, windows, resume position, non-finite stop, CLI."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hfjax import cli
from hfjax.testing.zoo import tiny_fuse_config
from hfjax.training import fuse_loop
from hfjax.training.loop import ResumeRefused
from hfjax.training.optim import cosine_with_warmup, total_steps


def test_schedule_equals_hf_cosine_with_warmup():
    torch = pytest.importorskip("torch")
    import transformers

    for steps, lr in ((40, 5e-5), (7, 1e-3), (225, 5e-5)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = transformers.get_cosine_schedule_with_warmup(opt, int(0.05 * steps), steps)
        ours = cosine_with_warmup(lr, steps, 0.05)
        for s in range(steps):
            assert math.isclose(float(ours(s)), sched.get_last_lr()[0], rel_tol=1e-5,
                                abs_tol=1e-12), (steps, s)
            opt.step()
            sched.step()
    assert float(cosine_with_warmup(5e-5, 225, 0.05)(0)) == 0.0  # first update at lr 0


def test_total_steps_as_original():
    assert total_steps(1800, 3, 8) == 675
    assert total_steps(10, 1, 8) == 1
    assert total_steps(1800, 3, 8, max_steps=10) == 10


def test_stack_window_pads_and_weights():
    a = {"input_ids": np.ones((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32),
         "labels": np.ones((2, 4), np.int32)}
    b = {k: np.ones((1, 8), np.int32) for k in a}
    batch, w = fuse_loop.stack_window([a, b], accum=3, batch_size=2, pad_id=7)
    assert batch["input_ids"].shape == (3, 2, 8)
    np.testing.assert_array_equal(w, [1, 1, 0])
    assert (batch["labels"][2] == -100).all() and (batch["attention_mask"][2] == 0).all()
    assert batch["input_ids"][1, 1, 0] == 7  # the short micro-batch's missing row is padding


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return tiny_zoo(n_replay=8)  # q/v sources: the loop does not depend on the modules


def test_stream_resume_position(zoo, tmp_path):
    cfg = tiny_fuse_config(zoo, tmp_path)
    inp = fuse_loop.prepare(cfg)
    kw = dict(batch_size=2, epochs=3, seed=0, buckets=(64, 128, 160), pad_id=0)
    full = list(fuse_loop.micro_batch_stream(inp.replay, **kw))
    assert len(full) == 3 * 8  # 16 examples / 2 per batch, 3 epochs
    for start in (0, 5, 8, 13):
        rest = list(fuse_loop.micro_batch_stream(inp.replay, start=start, **kw))
        assert len(rest) == len(full) - start
        for x, y in zip(rest, full[start:], strict=True):
            np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def _poison_loss_at(monkeypatch: pytest.MonkeyPatch, call: int) -> Any:
    """Make the fuse step report a NaN loss on its ``call``-th call (the update still runs);
    returns the real step."""
    real = fuse_loop.fuse_step
    calls = {"n": 0}

    def poisoned(state, frozen, batch, weights, key, *, st):
        state, m = real(state, frozen, batch, weights, key, st=st)
        calls["n"] += 1
        return state, ({**m, "loss": np.float32("nan")} if calls["n"] == call else m)

    monkeypatch.setattr(fuse_loop, "fuse_step", poisoned)
    return real


def _saved_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_non_finite_loss_stops_and_keeps_last_checkpoint(zoo, tmp_path, monkeypatch):
    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.train.checkpoint_every = 1
    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(fuse_loop.FuseRunError, match="non-finite loss nan at step 3.*step 2"):
        fuse_loop.run_fusion(cfg, progress=False)
    out = tmp_path / "tiny"
    assert not (out / "merged_lora").exists()
    assert _saved_steps(out)[-1] == 2


# Moved from test_loop.py (the shared loop's contract, on a real fuse run): here it reuses
# this module's compiled fuse step (same zoo and statics as the non-finite test).
def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fuse_resume_trims_metrics_and_honours_log_every(zoo, tmp_path, monkeypatch):
    cfg = tiny_fuse_config(zoo, tmp_path)  # 8 steps
    cfg.train.checkpoint_every = 3
    cfg.train.log_every = 2
    real = _poison_loss_at(monkeypatch, 5)
    with pytest.raises(fuse_loop.FuseRunError, match="non-finite loss nan at step 5"):
        fuse_loop.run_fusion(cfg, progress=False)
    out = tmp_path / "tiny"
    assert [r["step"] for r in _rows(out)] == [2, 4]  # row 4 is past the checkpoint at 3
    assert _saved_steps(out) == [3]
    monkeypatch.setattr(fuse_loop, "fuse_step", real)
    res = fuse_loop.run_fusion(cfg, progress=False)
    assert res.report["run"]["resumed_from_step"] == 3
    assert [r["step"] for r in _rows(out)] == [2, 4, 6, 8]
    assert set(_rows(out)[0]) >= {"loss", "lm_loss", "rdm", "grad_norm", "alpha", "time"}
    other = tiny_fuse_config(zoo, tmp_path)
    other.seed = 1
    with pytest.raises(ResumeRefused, match=r"checkpoint was made for seed=0, this run gives "
                                            r"seed=1"):
        fuse_loop.run_fusion(other, progress=False)


def test_no_update_when_an_epoch_is_shorter_than_accum(zoo, tmp_path):
    """Original windows (docs/algorithm.md §7): fewer micro-batches per epoch than accum -> no
    update, and the export is the target unchanged (ΔB is zero at init)."""
    from bridge import load_adapter

    cfg = tiny_fuse_config(zoo, tmp_path)
    cfg.train.grad_accum = 64
    res = fuse_loop.run_fusion(cfg, progress=False)
    assert res.steps == 0 and res.history == [] and res.report["run"]["steps_this_call"] == 0
    target, fused = load_adapter(zoo["target_adapter"]), load_adapter(res.adapter_dir)
    for name, m in target.modules.items():
        np.testing.assert_array_equal(fused.modules[name].B, m.B)


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    rc = cli.main(["fuse", "--config", str(tmp_path / "missing.py")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "missing.py" in err
    rc = cli.main(["fuse", "--config", "configs/fuse.py", "--config.train.lrr=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "train.lrr" in err and "train.lr" in err


def test_cli_unknown_dataset_fails_before_training(zoo, tmp_path, capsys):
    rc = cli.main(["fuse", "--config", "configs/fuse.py", "--quiet",
                   f"--config.target.model_path={zoo['base_llama']}",
                   f"--config.target.adapter_path={zoo['target_adapter']}",
                   f"--config.sources=q={zoo['qwen_adapter']}",
                   f"--config.data.data_root={zoo['data']}",
                   "--config.data.datasets=nope_replay",
                   f"--config.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "nope_replay" in err
    assert not any(tmp_path.iterdir())


def test_original_yaml_layout_runs(zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZOO", str(zoo["base_llama"].parent))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    yaml_file = tmp_path / "exp.yaml"
    yaml_file.write_text(textwrap.dedent("""\
        experiment_name: tiny_chain
        output_dir: ${OUT}
        base_model_path: ${ZOO}/base_llama
        initial_target_lora: ${ZOO}/lora_llama
        data_global: {dataset_dir: "${ZOO}/data", template: llama3, cutoff_len: 160,
                      batch_size: 2, num_workers: 4}
        tasks:
        - task_name: from_qwen
          source_lora_paths: ["${ZOO}/lora_qwen"]
          transfer_ratio: '1'
          datasets:
          - {name: movie_replay, type: main}
          - {name: relation_replay, type: replay, ratio: all}
          training: {fusion_group_name: g, embed_dim: 32, num_heads: 4,
                     max_position_embeddings: 64, num_epochs: 1, lr: 1.0e-3, alpha_init: 0.3,
                     gradient_accumulation_steps: 4, mu_gate: 0.1, lambda_reg: 0.005,
                     mu_target: 0.0, sigma_target: 1.0, num_projections: 16,
                     block_size: 16, base_dtype: float32}
        - task_name: then_mistral
          source_lora_paths: ["${ZOO}/lora_mistral"]
          transfer_ratio: 1/2
          datasets:
          - {name: movie_replay, type: main}
          training: {fusion_group_name: g, embed_dim: 32, num_heads: 4,
                     max_position_embeddings: 64, num_epochs: 1, lr: 1.0e-3, alpha_init: 0.3,
                     gradient_accumulation_steps: 4, mu_gate: 0.1, lambda_reg: 0.005,
                     mu_target: 0.0, sigma_target: 1.0, num_projections: 16,
                     block_size: 16, base_dtype: float32}
        """))
    rc = cli.main(["fuse", "--config", str(yaml_file), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    first = tmp_path / "out" / "from_qwen"
    second = tmp_path / "out" / "then_mistral"
    assert (first / "merged_lora" / "adapter_model.safetensors").exists()
    report = json.loads((second / "fusion_report.json").read_text())
    assert report["target_adapter"].endswith("from_qwen/merged_lora")  # chained target
    assert report["plan"]["transfer_ratio"] == 0.5
