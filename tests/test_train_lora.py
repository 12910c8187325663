"""`hfjax train-lora` on a tiny Llama: the loss falls, PEFT loads the export, resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from bridge import load_adapter
from hfjax import cli
from hfjax.config import ConfigError
from hfjax.loading import from_pretrained
from hfjax.models.decoder import module_names
from hfjax.testing import tasks
from hfjax.testing.models import build_base_model
from hfjax.testing.tokenizer import train_tokenizer
from hfjax.testing.zoo import SMALL
from hfjax.training.data import DataError, ReplaySet, collate
from hfjax.training.lora_train import (
    init_lora,
    load_train_config,
    train_lora,
    validate_train_config,
)
from hfjax.training.objective import lm_loss

STEPS = 8  # 16 records / batch 2 * 2 epochs // accum 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lora")
    tok = train_tokenizer(tasks.pretraining_corpus(300, seed=0), "llama", 320, root / "tok")
    build_base_model(root / "base", SMALL["llama"], tok, seed=1)
    splits = tasks.make_splits("movie", n_train=16, n_replay=0, n_test=0, seed=3)
    tasks.write_task_files(root / "data", {"movie": splits})
    return {"base": root / "base", "data": root / "data"}


def _overrides(tiny: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [f"model_path={tiny['base']}", f"data_root={tiny['data']}", "datasets=movie_train",
            f"output_dir={out}", "task_name=expert", "cutoff_len=160", "seed=0", "lora.r=4",
            "lora.alpha=8", "train.epochs=2", "train.batch_size=2", "train.grad_accum=2",
            "train.lr=3e-2", "train.warmup_ratio=0", "train.base_dtype=float32",
            "train.checkpoint_every=100", *extra]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    cfg = load_train_config(None, _overrides(tiny, tmp_path_factory.mktemp("full")))
    return cfg, train_lora(cfg, progress=False)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_init_is_peft_default(tiny):
    cfg = from_pretrained(tiny["base"]).config
    p1 = init_lora(cfg, r=4, target_modules=("q_proj", "down_proj"), key=jax.random.PRNGKey(0))
    p2 = init_lora(cfg, r=4, target_modules=("q_proj", "down_proj"), key=jax.random.PRNGKey(0))
    shapes = module_names(cfg)
    assert len(p1) == 2 * cfg.num_hidden_layers
    for name, p in p1.items():
        d_in, d_out = shapes[name]
        a = np.asarray(p["A"])
        assert a.shape == (4, d_in) and p["B"].shape == (d_out, 4)
        assert np.abs(a).max() <= 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) bound
        assert np.abs(a).max() > 0.8 / math.sqrt(d_in)
        assert not np.asarray(p["B"]).any()
        np.testing.assert_array_equal(a, np.asarray(p2[name]["A"]))


def test_loss_falls_and_outputs_written(trained):
    cfg, adapter_dir = trained
    run_dir = adapter_dir.parent
    assert adapter_dir == Path(cfg.output_dir) / "expert" / "adapter"
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    report = json.loads((run_dir / "train_report.json").read_text())
    assert report["run"]["steps"] == STEPS and report["run"]["compilations"] <= 2
    assert report["modules"] == 7 * SMALL["llama"].layers


def test_trained_adapter_lowers_the_training_loss(tiny, trained):
    # The per-step losses are noisy (a different batch each step); the whole set is not.
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny["base"])
    data = ReplaySet.load(["movie_train"], tiny["data"], tok, "llama3", 160)
    batch = collate(data.examples, 160, tok.pad_token_id or 0)
    model = from_pretrained(tiny["base"], dtype="float32")
    adapter = load_adapter(trained[1]).to_jax()
    base_loss = float(lm_loss(model.params, model.config, batch, {}))
    lora_loss = float(lm_loss(model.params, model.config, batch, adapter))
    assert lora_loss < base_loss - 0.05, (base_loss, lora_loss)


def test_export_loads_in_peft_and_matches_our_forward(tiny, trained):
    pytest.importorskip("peft")
    import peft
    import torch
    import transformers

    cfg, adapter_dir = trained
    conf = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["inference_mode"] is True
    assert conf["base_model_name_or_path"] == str(tiny["base"])
    assert sorted(conf["target_modules"]) == sorted(cfg.lora.target_modules)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tiny["base"], dtype=torch.float32, attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    ids = np.random.default_rng(0).integers(3, 300, size=(2, 24)).astype(np.int64)
    with torch.no_grad():
        theirs = pm(input_ids=torch.from_numpy(ids)).logits.numpy()
    model = from_pretrained(tiny["base"], dtype="float32")
    adapter = load_adapter(adapter_dir)
    ours = np.asarray(model(ids, adapter=adapter))
    base = np.asarray(model(ids))
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours - base).max() > 1e-2  # the trained LoRA changes the output


def test_resume_after_stop_gives_same_adapter(tiny, trained, tmp_path):
    _, full_dir = trained
    cfg = load_train_config(None, _overrides(tiny, tmp_path))
    run_dir = train_lora(cfg, progress=False, stop_after=3)
    assert run_dir == tmp_path / "expert" and not (run_dir / "adapter").exists()
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]
    adapter_dir = train_lora(cfg, progress=False)
    report = json.loads((run_dir / "train_report.json").read_text())
    assert report["run"]["resumed_from_step"] == 3 and report["run"]["steps_this_call"] == 5
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, STEPS + 1))
    full, resumed = load_adapter(full_dir), load_adapter(adapter_dir)
    assert list(full.modules) == list(resumed.modules)
    for name, m in full.modules.items():
        np.testing.assert_allclose(resumed.modules[name].A, m.A, atol=1e-6, rtol=0)
        np.testing.assert_allclose(resumed.modules[name].B, m.B, atol=1e-6, rtol=0)


@pytest.mark.parametrize("override, field", [
    ("lora.dropout=0.1", "lora.dropout"),
    ("lora.target_modules=q_proj,lm_head", "lora.target_modules"),
    ("template=chatml", "template"),
    ("train.max_steps=0", "train.max_steps"),
    ("model_path=/nonexistent/model", "model_path"),
])
def test_bad_values_name_the_field(tiny, tmp_path, override, field):
    cfg = load_train_config(None, _overrides(tiny, tmp_path, override))
    with pytest.raises(ConfigError, match=f"^{field}="):
        validate_train_config(cfg)


def test_unknown_field_and_bad_type(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown field 'lora.rank'.*'lora.r'"):
        load_train_config(None, ["lora.rank=4"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_train_config(None, ["train.epochs=three"])


def test_missing_dataset_names_the_data_root(tiny, tmp_path):
    cfg = load_train_config(None, _overrides(tiny, tmp_path, "datasets=nope"))
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        train_lora(cfg, progress=False)


def test_config_files_py_and_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("HFJAX_TEST_ROOT", str(tmp_path))
    py = tmp_path / "expert.py"
    py.write_text("import ml_collections\n\n"
                  "def get_config():\n"
                  "    c = ml_collections.ConfigDict()\n"
                  "    c.model_path = '${HFJAX_TEST_ROOT}/m'\n"
                  "    c.lora = ml_collections.ConfigDict({'r': 16})\n"
                  "    return c\n")
    cfg = load_train_config(py, ["train.lr=2e-4"])
    assert cfg.model_path == f"{tmp_path}/m" and cfg.lora.r == 16 and cfg.train.lr == 2e-4
    assert cfg.lora.alpha == 16 and cfg.train.epochs == 3  # schema defaults kept
    yml = tmp_path / "expert.yaml"
    yml.write_text("datasets: [a, b]\nlora: {target_modules: [q_proj, v_proj]}\n")
    cfg = load_train_config(yml)
    assert cfg.datasets == ("a", "b") and cfg.lora.target_modules == ("q_proj", "v_proj")
    yml.write_text("lora: {dropuot: 0.1}\n")
    with pytest.raises(ConfigError, match=r"expert.yaml: unknown field 'lora.dropuot'"):
        load_train_config(yml)


def test_cli_bad_input_exits_2(tiny, tmp_path, capsys):
    config_file = Path(__file__).resolve().parents[1] / "configs" / "train_lora.py"
    args = ["train-lora", "--config", str(config_file), "--quiet",
            *[f"--config.{o}" for o in _overrides(tiny, tmp_path, "lora.dropout=0.1")]]
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    assert "lora.dropout=0.1" in capsys.readouterr().err


def test_mismatched_checkpoint_is_refused(tiny, trained):
    cfg, _ = trained
    other = load_train_config(None, _overrides(tiny, Path(cfg.output_dir), "lora.r=8"))
    with pytest.raises(ConfigError, match="checkpoint was made for r=4"):
        train_lora(other, progress=False)
