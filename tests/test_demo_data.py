"""Tests for the synthetic tasks and tokenizers (hfjax.testing.tasks, hfjax.testing.tokenizer)."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from hfjax.testing.tasks import (
    TASKS,
    make_splits,
    make_task,
    parse_output,
    pretraining_corpus,
    write_task_files,
)
from hfjax.testing.tokenizer import (
    DEFAULT_VOCAB_SIZES,
    FAMILY_SPECIAL_TOKENS,
    FAMILY_TOKEN_ROLES,
    train_tokenizer,
)

FAMILIES = ("llama", "qwen2", "mistral")


# ------------------------------------------------------------------------------------ tasks


def test_task_registry() -> None:
    assert len(TASKS) >= 4
    assert {t.kind for t in TASKS.values()} == {"ner", "re", "et"}
    for name, spec in TASKS.items():
        assert spec.name == name
        assert len(set(spec.labels)) == len(spec.labels)
    for a, b in itertools.combinations(TASKS.values(), 2):
        assert set(a.labels) != set(b.labels), (a.name, b.name)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_make_task_deterministic(name: str) -> None:
    a = make_task(name, 50, seed=0)
    assert a == make_task(name, 50, seed=0)
    assert a != make_task(name, 50, seed=1)
    assert make_task(name, 20, seed=0) == a[:20]
    assert len({r["input"] for r in a}) == 50


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_disjoint(name: str) -> None:
    splits = make_splits(name, n_train=200, n_replay=60, n_test=50, seed=3)
    assert list(splits) == ["train", "replay", "test"]
    assert [len(splits[k]) for k in ("train", "replay", "test")] == [200, 60, 50]
    inputs = [{r["input"] for r in recs} for recs in splits.values()]
    assert sum(len(s) for s in inputs) == 310
    for x, y in itertools.combinations(inputs, 2):
        assert not x & y
    assert splits == make_splits(name, n_train=200, n_replay=60, n_test=50, seed=3)
    # Test/replay sets do not depend on the train size.
    other = make_splits(name, n_train=10, n_replay=60, n_test=50, seed=3)
    assert other["test"] == splits["test"] and other["replay"] == splits["replay"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_record_style_and_outputs(name: str) -> None:
    spec = TASKS[name]
    for rec in make_task(name, 200, seed=7):
        assert set(rec) == {"instruction", "input", "output", "history"}
        assert rec["history"] == []
        ins, text, out = rec["instruction"], rec["input"], rec["output"]
        assert ins.endswith("\nAnswer:")
        assert f"\nOption: {', '.join(spec.labels)} \n" in ins
        assert f"\nText: {text} \n" in ins
        assert ("\n Entities: " in ins) == (spec.kind == "et")
        assert out.startswith(" ") and not out.startswith("  ") and out == out.rstrip()
        parsed = parse_output(out, spec.kind)
        assert parsed, out
        assert len(parsed) == len(out.split("; "))
        for item in parsed:
            assert item[0] in spec.labels, (item, spec.labels)
            for span in item[1:]:
                assert span in text, (span, text)
        if spec.kind == "re":
            assert out == " " + "; ".join(f"{r}: {h}, {t}" for r, h, t in parsed)
        else:
            assert out == " " + "; ".join(f"{t}: {s}" for t, s in parsed)
        if spec.kind == "et":
            listed = ins.split("\n Entities: ")[1].split(" \nAnswer:")[0].split(", ")
            assert listed == [s for _, s in parsed]


def test_parse_output_edge_cases() -> None:
    assert parse_output(" None") == []
    assert parse_output("") == []
    assert parse_output(" genre: comedy; year:; junk; actor: bo ly") == [
        ("genre", "comedy"),
        ("actor", "bo ly"),
    ]
    assert parse_output(" works for: A B, C; born in: D", "re") == [("works for", "A B", "C")]


def test_write_task_files(tmp_path: Path) -> None:
    splits = {n: make_splits(n, n_train=5, n_replay=3, n_test=2, seed=0) for n in ("movie", "news")}
    info = write_task_files(tmp_path / "data", splits)
    on_disk = json.loads((tmp_path / "data" / "dataset_info.json").read_text())
    assert on_disk == info
    assert set(info) == {f"{t}_{s}" for t in splits for s in ("train", "replay", "test")}
    for ds_name, entry in info.items():
        assert entry == {"file_name": f"{ds_name}.json"}
        task, split = ds_name.rsplit("_", 1)
        written = json.loads((tmp_path / "data" / entry["file_name"]).read_text())
        assert written == splits[task][split]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        ["dataset_info.json"] + [e["file_name"] for e in info.values()]
    )


def test_pretraining_corpus() -> None:
    docs = pretraining_corpus(200, seed=0)
    assert len(docs) == 200 and all(isinstance(d, str) and d for d in docs)
    assert docs == pretraining_corpus(200, seed=0)
    assert docs != pretraining_corpus(200, seed=1)
    assert any(d.count("\nAnswer:") == 1 for d in docs)  # some formatted task examples
    assert sum("\nAnswer:" not in d for d in docs) > 100  # mostly generic text
    test_inputs = {r["input"] for n in TASKS for r in make_task(n, 300, seed=0)}
    excl = pretraining_corpus(200, seed=0, exclude_inputs=test_inputs)
    for d in excl:
        if "\nAnswer:" in d:
            assert d.split("\nText: ")[1].split(" \n")[0] not in test_inputs


# ------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretraining_corpus(600, seed=0)


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    dirs = {}
    for fam in FAMILIES:
        start = time.perf_counter()
        train_tokenizer(corpus, fam, DEFAULT_VOCAB_SIZES[fam], root / fam)
        assert time.perf_counter() - start < 20.0
        dirs[fam] = root / fam
    return dirs


def _task_texts() -> list[str]:
    texts = []
    for name in TASKS:
        for rec in make_task(name, 15, seed=11):
            texts += [rec["instruction"] + "\n" + rec["input"], rec["output"], rec["output"] + "\n"]
    return texts + ["  two  spaces . and ünïcödé 🚗 , 1960 s\n\n tab\tx"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_loads_and_roles(tok_dirs: dict[str, Path], family: str) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[family])
    assert DEFAULT_VOCAB_SIZES[family] - 64 < len(tok) <= DEFAULT_VOCAB_SIZES[family]
    roles = FAMILY_TOKEN_ROLES[family]
    for role in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tok, role) == roles[role]
        if roles[role] is not None:
            assert getattr(tok, role + "_id") == tok.convert_tokens_to_ids(roles[role])
    assert tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    if family == "qwen2":
        assert tok.bos_token_id is None
    else:
        assert tok.bos_token_id is not None
    ids = tok.encode("show me a comedy", add_special_tokens=False)
    with_special = tok.encode("show me a comedy", add_special_tokens=True)
    assert with_special == ([] if family == "qwen2" else [tok.bos_token_id]) + ids
    assert all(i not in tok.all_special_ids for i in ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_single_ids(tok_dirs: dict[str, Path], family: str) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[family])
    special_ids = set()
    for s in FAMILY_SPECIAL_TOKENS[family]:
        assert s in tok.all_special_tokens
        sid = tok.convert_tokens_to_ids(s)
        special_ids.add(sid)
        assert tok.encode(s, add_special_tokens=False) == [sid]
        ids = tok.encode(f"Text: a{s}\n b", add_special_tokens=False)
        assert ids.count(sid) == 1
        assert tok.decode(ids) == f"Text: a{s}\n b"
    assert len(special_ids) == len(FAMILY_SPECIAL_TOKENS[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_roundtrip_task_text(tok_dirs: dict[str, Path], family: str) -> None:
    tok = AutoTokenizer.from_pretrained(tok_dirs[family])
    for text in _task_texts():
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # Leading space of an output survives when tokenized on its own.
    assert tok.decode(tok.encode(" genre: comedy", add_special_tokens=False)) == " genre: comedy"


@pytest.mark.parametrize(
    ("family", "config_cls"),
    [("llama", LlamaConfig), ("qwen2", Qwen2Config), ("mistral", MistralConfig)],
)
def test_load_next_to_model_config(
    tok_dirs: dict[str, Path], tmp_path: Path, family: str, config_cls: type
) -> None:
    """With the model's config.json in the same folder the tokenizer encodes identically."""
    ref = AutoTokenizer.from_pretrained(tok_dirs[family])
    d = tmp_path / family
    shutil.copytree(tok_dirs[family], d)
    config_cls(
        vocab_size=len(ref),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
    ).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    for text in _task_texts():
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == ref.encode(
                text, add_special_tokens=add
            )
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (
        ref.eos_token_id,
        ref.pad_token_id,
        ref.bos_token_id,
    )


def test_tokenizer_deterministic_and_heterogeneous(
    tok_dirs: dict[str, Path], corpus: list[str], tmp_path: Path
) -> None:
    again = train_tokenizer(iter(corpus), "llama", DEFAULT_VOCAB_SIZES["llama"], tmp_path / "x")
    assert (tmp_path / "x" / "tokenizer.json").read_text() == (
        tok_dirs["llama"] / "tokenizer.json"
    ).read_text()
    assert again.get_vocab() == AutoTokenizer.from_pretrained(tok_dirs["llama"]).get_vocab()
    toks = {f: AutoTokenizer.from_pretrained(tok_dirs[f]) for f in FAMILIES}
    assert len({len(t) for t in toks.values()}) == len(FAMILIES)
    text = make_task("movie", 1, seed=0)[0]["instruction"]
    encodings = [tuple(t.encode(text, add_special_tokens=False)) for t in toks.values()]
    assert len(set(encodings)) == len(FAMILIES)


def test_chat_templates_match_spec(tok_dirs: dict[str, Path]) -> None:
    msgs = [{"role": "user", "content": "U"}, {"role": "assistant", "content": " out"}]
    expected = {
        "llama": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n out<|eot_id|>",
        "qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n out<|im_end|>\n",
        "mistral": "<s>[INST] U [/INST] out</s>",
    }
    for fam in FAMILIES:
        tok = AutoTokenizer.from_pretrained(tok_dirs[fam])
        assert tok.apply_chat_template(msgs, tokenize=False) == expected[fam]


def test_tokenizer_rejects_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        train_tokenizer(["a b"], "gpt2", 1000, tmp_path)
    with pytest.raises(ValueError):
        train_tokenizer(["a b"], "llama", 200, tmp_path)
