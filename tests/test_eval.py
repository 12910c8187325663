"""`hfjax eval`: batched left-padded generation equals one-by-one, files and metrics, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bridge import save_adapter
from hfjax import cli
from hfjax.eval.generation import generate_answers, left_pad, prompt_bucket
from hfjax.eval.metrics import strip_generation
from hfjax.eval.run import evaluate, infer_task
from hfjax.loading import from_pretrained
from hfjax.testing import tasks
from hfjax.testing.models import build_base_model, model_config, random_lora
from hfjax.testing.tokenizer import train_tokenizer
from hfjax.testing.zoo import SMALL
from hfjax.training.data import DataError
from hfjax.training.templates import get_template, user_message

N_TEST = 6
BATCH = 4
NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_eval")
    tok = train_tokenizer(tasks.pretraining_corpus(300, seed=0), "llama", 320, root / "tok")
    model = build_base_model(root / "base", SMALL["llama"], tok, seed=1)
    splits = tasks.make_splits("movie", n_train=0, n_replay=0, n_test=N_TEST, seed=3)
    tasks.write_task_files(root / "data", {"movie": splits})
    labels = [{"instruction": f"Is this review positive or negative?\n{t}", "input": "",
               "output": f" {lab}"}
              for t, lab in [("great film", "positive"), ("dull plot", "negative"),
                             ("loved it", "positive"), ("a mess", "negative")]]
    (root / "data" / "sst.json").write_text(json.dumps(labels))
    lora = random_lora(model.config, r=4, alpha=8, seed=5, b_std=0.5)
    other = model_config(SMALL["qwen2"], tok)
    return {"base": root / "base", "test": root / "data" / "movie_test.json",
            "sst": root / "data" / "sst.json", "root": root,
            "adapter": save_adapter(lora, root / "lora"),
            "wrong_adapter": save_adapter(random_lora(other, r=4, seed=6), root / "lora_qwen")}


@pytest.fixture(scope="module")
def model_and_tok(tiny):
    import transformers

    return (from_pretrained(tiny["base"], dtype="float32"),
            transformers.AutoTokenizer.from_pretrained(tiny["base"]))


def test_left_pad_and_buckets():
    ids, mask = left_pad([[5, 6, 7], [8]], 4, 0)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert [prompt_bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]


def test_batched_equals_one_by_one(tiny, model_and_tok):
    """Left-padded batches (mixed lengths, bucketed) give exactly the unpadded answers."""
    from bridge import load_adapter

    model, tok = model_and_tok
    records = json.loads(tiny["test"].read_text())[:BATCH]
    adapter = load_adapter(tiny["adapter"])  # a LoRA makes the tiny model's answers varied
    batched = generate_answers(model, tok, records, template="llama3", adapter=adapter,
                               batch_size=BATCH, max_new_tokens=NEW, progress=False)
    tpl = get_template("llama3")
    stops = tpl.stop_ids(tok)
    single = []
    lengths = set()
    for rec in records:  # no padding at all: one prompt at its own length
        prompt = tpl.encode_prompt(tok, user_message(rec))
        lengths.add(len(prompt))
        out = model.generate(np.asarray([prompt]), NEW, adapter, eos_token_id=tuple(stops))
        new = [int(t) for t in out[0, len(prompt):]]
        new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
        single.append(strip_generation(tok.decode(new, skip_special_tokens=True)))
    assert len(lengths) > 1  # the batch really mixes lengths (left padding is exercised)
    assert batched == single
    assert any(single)


def test_adapter_changes_answers(tiny, model_and_tok):
    from bridge import load_adapter

    model, tok = model_and_tok
    records = json.loads(tiny["test"].read_text())
    kw = dict(template="llama3", batch_size=BATCH, max_new_tokens=NEW, progress=False)
    base = generate_answers(model, tok, records, **kw)
    lora = generate_answers(model, tok, records, adapter=load_adapter(tiny["adapter"]), **kw)
    assert base != lora


def test_evaluate_writes_predictions_and_metrics(tiny, tmp_path):
    out = tmp_path / "ev"
    metrics = evaluate(tiny["base"], tiny["test"], adapter_path=tiny["adapter"], out_dir=out,
                       batch_size=BATCH, max_new_tokens=NEW, progress=False)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == N_TEST
    assert all(set(r) == {"instruction", "input", "reference", "prediction"} for r in rows)
    records = json.loads(tiny["test"].read_text())
    assert [r["reference"] for r in rows] == [r["output"] for r in records]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["task"] == "uie" and metrics["n"] == N_TEST
    assert {"precision", "recall", "f1", "exact_match", "n_gold"} <= set(metrics)
    assert metrics["run"]["template"] == "llama3"
    assert not list(out.glob("*.tmp"))

    limited = evaluate(tiny["base"], tiny["test"], out_dir=tmp_path / "lim", limit=2,
                       batch_size=BATCH, max_new_tokens=NEW, progress=False)
    assert limited["n"] == 2
    assert len((tmp_path / "lim" / "predictions.jsonl").read_text().splitlines()) == 2


def test_classification_task_auto(tiny, tmp_path):
    metrics = evaluate(tiny["base"], tiny["sst"], out_dir=tmp_path, batch_size=BATCH,
                       max_new_tokens=NEW, progress=False)
    assert metrics["task"] == "classification" and metrics["n"] == 4
    assert {"accuracy", "f1", "mcc"} <= set(metrics)
    rows = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert "instruction" in json.loads(rows[0]) and len(rows) == 4


def test_infer_task():
    assert infer_task([" positive", " negative", "positive<|eot_id|>"]) == "classification"
    assert infer_task([" not_entailment", " entailment"]) == "classification"
    assert infer_task([" genre: scary; year: 1960 s", " None"]) == "uie"
    assert infer_task([" None", " None"]) == "uie"
    assert infer_task([" Work for: Fred, Habitat"]) == "uie"


def test_errors_name_the_input(tiny, tmp_path):
    with pytest.raises(DataError, match="missing.json"):
        evaluate(tiny["base"], tmp_path / "missing.json", progress=False)
    with pytest.raises(ValueError, match="template 'chatml'"):
        evaluate(tiny["base"], tiny["test"], template="chatml", progress=False)
    with pytest.raises(ValueError, match="tokenizer has no token"):  # qwen specials absent
        evaluate(tiny["base"], tiny["test"], template="qwen", progress=False)
    with pytest.raises(ValueError, match="task 'ner'"):
        evaluate(tiny["base"], tiny["test"], task="ner", progress=False)
    with pytest.raises(ValueError, match="lora_qwen"):
        evaluate(tiny["base"], tiny["test"], adapter_path=tiny["wrong_adapter"], progress=False)
    assert not (tmp_path / "predictions.jsonl").exists()


def test_cli_eval(tiny, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["eval", "--model", str(tiny["base"]), "--data", str(tiny["test"]),
                   "--out", str(out), "--batch_size", str(BATCH), "--max_new_tokens", str(NEW),
                   "--limit", "3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "uie:" in printed and "f1" in printed
    assert json.loads((out / "metrics.json").read_text())["n"] == 3
    rc = cli.main(["eval", "--model", str(tiny["base"]), "--data", str(tmp_path / "nope.json")])
    assert rc == cli.EXIT_BAD_INPUT
    assert "nope.json" in capsys.readouterr().err
