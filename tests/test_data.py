"""Replay data: chat templates, masking, truncation, bucketing and the epoch order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hfjax.config.components import DataSpec
from hfjax.eval.metrics import parse_uie
from hfjax.training.data import (
    IGNORE_INDEX,
    DataError,
    DatasetRole,
    Example,
    ReplaySet,
    bucket_for,
    encode_dataset,
    encode_example,
    epoch_order,
    infer_seqlen,
    iterate_batches,
    length_buckets,
    load_alpaca,
    num_batches,
    replay_count,
    resolve_dataset,
    sample_indices,
)
from hfjax.training.templates import TEMPLATES, ChatTemplate, get_template, user_message

UIE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "uie_sample300"
UIE_FILES = {
    "mit-movie_sample300": "ner",
    "TweetNER7_sample_15000_sample300": "ner",
    "RE_conll04_sample300": "re",
    "RE_New-York-Times-RE_sample_30000_sample300": "re",
    "ET_FindVehicle_sample300": "et",
    "ET_FabNER_sample300": "et",
}

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
OLMO_SPECIALS = ["<|endoftext|>", "<|pad|>"]
ALL_SPECIALS = (*LLAMA3_SPECIALS, *QWEN_SPECIALS, *MISTRAL_SPECIALS, *GEMMA_SPECIALS,
                *OLMO_SPECIALS)


def make_tokenizer(specials: list[str], bos: str | None, eos: str, unk: str | None = None):
    """A byte-level BPE without merges (one token per byte) plus ``specials`` as single tokens.

    Decoding is exact, so ids can be checked against the rendered text byte for byte.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    kw = {"eos_token": eos}
    if bos is not None:
        kw["bos_token"] = bos
    if unk is not None:
        kw["unk_token"] = unk
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="module")
def toks():
    # Base-model EOS tokens on purpose: the llama3/qwen end token must come from the template.
    return {
        "llama3": make_tokenizer(LLAMA3_SPECIALS, "<|begin_of_text|>", "<|end_of_text|>"),
        "qwen": make_tokenizer(QWEN_SPECIALS, None, "<|endoftext|>"),
        "mistral": make_tokenizer(MISTRAL_SPECIALS, "<s>", "</s>", unk="<unk>"),
        "gemma": make_tokenizer(GEMMA_SPECIALS, "<bos>", "<eos>"),
        "olmo": make_tokenizer(OLMO_SPECIALS, "<|endoftext|>", "<|endoftext|>"),
    }


USER = 'Please tell me.Output format is "type1: word1". \nOption: a, b \nText: x y \nAnswer:\nx y'
OUTPUT = " genre: scary; year: 1960 s"

SPEC_TEXT = {  # docs/algorithm.md §8, byte for byte
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + USER
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        OUTPUT + "<|eot_id|>",
    ),
    "qwen": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + USER
        + "<|im_end|>\n<|im_start|>assistant\n",
        OUTPUT + "<|im_end|>",
    ),
    "mistral": ("<s>[INST] " + USER + " [/INST]", OUTPUT + "</s>"),
    # LlamaFactory's gemma (efficient_eos: the tokenizer's EOS once after the response) and
    # olmo (format_prefix = the EOS token; no newline before <|assistant|>).
    "gemma": ("<bos><start_of_turn>user\n" + USER + "<end_of_turn>\n<start_of_turn>model\n",
              OUTPUT + "<eos>"),
    "olmo": ("<|endoftext|><|user|>\n" + USER + "<|assistant|>\n", OUTPUT + "<|endoftext|>"),
}


# --------------------------------------------------------------------------------------------
# templates
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama3", "qwen", "mistral", "gemma", "olmo"])
def test_template_text_is_byte_exact_and_ids_decode_to_it(toks, name):
    tok, tpl = toks[name], get_template(name)
    prompt_text, response_text = tpl.render(tok, USER, OUTPUT)
    assert (prompt_text, response_text) == SPEC_TEXT[name]
    prompt_ids, response_ids = tpl.encode(tok, USER, OUTPUT)
    assert tok.decode(prompt_ids) == prompt_text
    assert tok.decode(response_ids) == response_text
    # every special token of the text is one id, and appears exactly where the text has it
    for special in ALL_SPECIALS:
        sid = tok.convert_tokens_to_ids(special)
        if sid is None or sid == tok.unk_token_id:
            continue
        assert prompt_ids.count(sid) == prompt_text.count(special)
        assert response_ids.count(sid) == response_text.count(special)


def test_bos_and_end_ids(toks):
    p, r = get_template("llama3").encode(toks["llama3"], "u", "o")
    assert p[0] == toks["llama3"].convert_tokens_to_ids("<|begin_of_text|>")
    assert r[-1] == toks["llama3"].convert_tokens_to_ids("<|eot_id|>")  # not the base EOS
    p, r = get_template("qwen").encode(toks["qwen"], "u", "o")
    assert p[0] == toks["qwen"].convert_tokens_to_ids("<|im_start|>")  # qwen has no BOS
    assert r[-1] == toks["qwen"].convert_tokens_to_ids("<|im_end|>")
    p, r = get_template("mistral").encode(toks["mistral"], "u", "o")
    assert p[0] == toks["mistral"].bos_token_id
    assert r[-1] == toks["mistral"].eos_token_id
    p, r = get_template("gemma").encode(toks["gemma"], "u", "o")
    assert p[0] == toks["gemma"].bos_token_id and r[-1] == toks["gemma"].eos_token_id
    assert p[1] == toks["gemma"].convert_tokens_to_ids("<start_of_turn>")
    p, r = get_template("olmo").encode(toks["olmo"], "u", "o")
    assert p[0] == toks["olmo"].eos_token_id and r[-1] == toks["olmo"].eos_token_id
    assert p.count(toks["olmo"].eos_token_id) == 1
    with pytest.raises(ValueError, match="gemma.*<start_of_turn>"):
        get_template("gemma").check_tokenizer(toks["qwen"])
    tpl, tok = get_template("llama3"), toks["llama3"]
    assert tpl.encode_prompt(tok, "u") == tpl.encode(tok, "u", "o")[0]
    assert tpl.stop_ids(tok) == [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id]
    assert get_template("mistral").stop_ids(toks["mistral"]) == [toks["mistral"].eos_token_id]
    # an empty output is just the end token
    im_end = toks["qwen"].convert_tokens_to_ids("<|im_end|>")
    assert get_template("qwen").encode(toks["qwen"], "u", "")[1] == [im_end]


class _Recorder:
    """Wraps a tokenizer and records every ``encode`` call (text, add_special_tokens)."""

    def __init__(self, tok):
        self.tok, self.calls = tok, []

    def __getattr__(self, item):
        return getattr(self.tok, item)

    def encode(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        return self.tok.encode(text, add_special_tokens=add_special_tokens)


def test_each_element_is_tokenized_separately_without_special_tokens(toks):
    # LlamaFactory encodes system block, user block and output one by one (this matters for
    # SentencePiece tokenizers, which add a word-boundary prefix to each piece).
    rec = _Recorder(toks["qwen"])
    get_template("qwen").encode(rec, "hi", " out")
    assert rec.calls == [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", False),
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        (" out", False),
    ]


def test_template_refuses_a_tokenizer_without_its_special_tokens(toks):
    with pytest.raises(ValueError, match="<\\|im_start\\|>"):
        get_template("qwen").check_tokenizer(toks["llama3"])
    with pytest.raises(ValueError, match="llama3.*<\\|start_header_id\\|>"):
        encode_dataset([{"instruction": "i", "output": "o"}], toks["mistral"], "llama3", 64)


def test_every_family_has_its_auto_template():
    from hfjax.models.families import FAMILIES, template_for

    assert {m: template_for(m) for m in ("qwen3", "gemma2", "gemma3_text", "olmo2")} == {
        "qwen3": "qwen", "gemma2": "gemma", "gemma3_text": "gemma", "olmo2": "olmo"}
    assert {f.template for f in FAMILIES.values()} <= set(TEMPLATES)


def test_get_template_unknown_lists_known():
    with pytest.raises(ValueError, match="gemma, llama3, mistral, olmo, qwen"):
        get_template("vicuna")
    assert get_template(TEMPLATES["qwen"]) is TEMPLATES["qwen"]
    with pytest.raises(ValueError, match="content"):
        ChatTemplate(name="bad", user="no placeholder")


def test_user_message_follows_alpaca_converter():
    assert user_message({"instruction": "I", "input": "X", "output": "o"}) == "I\nX"
    assert user_message({"instruction": "I", "input": "", "output": "o"}) == "I"
    assert user_message({"instruction": "I", "output": "o"}) == "I"
    assert user_message({"instruction": "I", "input": None, "output": "o",
                         "history": [["q", "a"]]}) == "I"


# --------------------------------------------------------------------------------------------
# masking and truncation
# --------------------------------------------------------------------------------------------
def test_labels_mask_the_prompt_and_supervise_the_response(toks):
    record = {"instruction": "Find it.", "input": "a b", "output": " x: y"}
    ex = encode_example(record, toks["llama3"], "llama3", cutoff_len=1024, name="t")
    p, r = get_template("llama3").encode(toks["llama3"], "Find it.\na b", " x: y")
    assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32
    assert ex.input_ids.tolist() == p + r
    assert ex.labels.tolist() == [IGNORE_INDEX] * len(p) + r
    assert ex.source == "t" and ex.n_supervised == len(r) and len(ex) == len(p) + len(r)


@pytest.mark.parametrize("source,target,cutoff,expected", [
    (100, 20, 1024, (100, 20)),      # fits
    (2000, 20, 1024, (1004, 20)),    # short target kept whole, source cut
    (100, 2000, 1024, (100, 924)),   # short source kept whole, target cut
    (1000, 1000, 1024, (512, 512)),  # both cut in proportion
    (600, 900, 1024, (410, 614)),    # int(1024 * 900 / 1500) = 614
    (10, 3, 0, (0, 0)),
])
def test_infer_seqlen(source, target, cutoff, expected):
    assert infer_seqlen(source, target, cutoff) == expected
    s, t = infer_seqlen(source, target, cutoff)
    assert s + t <= max(cutoff, 0) and s <= source and t <= target


def test_truncation_keeps_heads_as_infer_seqlen_says(toks):
    record = {"instruction": "p" * 50, "output": "r" * 40}
    tpl = get_template("qwen")
    p, r = tpl.encode(toks["qwen"], "p" * 50, "r" * 40)
    for cutoff in (16, 33, 64, 100, 1000):
        ex = encode_example(record, toks["qwen"], tpl, cutoff)
        s, t = infer_seqlen(len(p), len(r), cutoff)
        assert len(ex) == s + t <= cutoff
        assert ex.input_ids.tolist() == p[:s] + r[:t]
        assert ex.labels.tolist() == [IGNORE_INDEX] * s + r[:t]
    with pytest.raises(ValueError, match="cutoff_len"):
        encode_dataset([record], toks["qwen"], tpl, 0)


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
def test_length_buckets_and_bucket_for():
    assert length_buckets(1024) == (32, 64, 128, 256, 512, 1024)
    assert length_buckets(300) == (32, 64, 128, 256, 300)
    assert length_buckets(20) == (20,)
    assert length_buckets(100, min_len=20) == (32, 64, 100)
    b = length_buckets(300)
    assert [bucket_for(n, b) for n in (1, 32, 33, 257, 300)] == [32, 32, 64, 300, 300]
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(301, b)


def test_epoch_order_is_a_deterministic_permutation_per_seed_and_epoch():
    a = epoch_order(50, epoch=0, seed=7)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, epoch=0, seed=7))
    assert not np.array_equal(a, epoch_order(50, epoch=1, seed=7))
    assert not np.array_equal(a, epoch_order(50, epoch=0, seed=8))
    assert num_batches(50, 8) == 7 and num_batches(48, 8) == 6 and num_batches(0, 8) == 0


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 90))
        prompt = int(rng.integers(1, length))
        ids = np.arange(1000 * i, 1000 * i + length, dtype=np.int32)  # unique ids -> traceable
        labels = ids.copy()
        labels[:prompt] = IGNORE_INDEX
        out.append(Example(ids, labels, source=f"d{i % 3}"))
    return out


def test_batches_are_padded_to_buckets_deterministic_and_resumable():
    examples, buckets = _examples(23), length_buckets(128, min_len=16)
    kw = dict(batch_size=4, seed=3, buckets=buckets, pad_id=-7)
    epoch0 = list(iterate_batches(examples, epoch=0, **kw))
    assert len(epoch0) == num_batches(23, 4) == 6
    assert [b["input_ids"].shape[0] for b in epoch0] == [4, 4, 4, 4, 4, 3]  # partial batch kept
    seen = []
    for batch in epoch0:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == np.int32
        lengths = mask.sum(axis=1)
        assert ids.shape[1] == bucket_for(int(lengths.max()), buckets)
        for row, length in enumerate(lengths):
            ex = examples[int(ids[row, 0]) // 1000]
            seen.append(int(ids[row, 0]) // 1000)
            assert length == len(ex)
            assert np.array_equal(ids[row, :length], ex.input_ids)
            assert np.array_equal(labels[row, :length], ex.labels)
            assert (mask[row, :length] == 1).all() and (mask[row, length:] == 0).all()
            assert (ids[row, length:] == -7).all() and (labels[row, length:] == IGNORE_INDEX).all()
    assert sorted(seen) == list(range(23))  # every example once per epoch, in epoch_order
    assert seen == epoch_order(23, 0, 3).tolist()

    again = list(iterate_batches(examples, epoch=0, **kw))
    assert all(np.array_equal(a["input_ids"], b["input_ids"])
               for a, b in zip(epoch0, again, strict=True))
    epoch1 = list(iterate_batches(examples, epoch=1, **kw))
    assert any(not np.array_equal(a["input_ids"], b["input_ids"])
               for a, b in zip(epoch0, epoch1, strict=True))
    resumed = list(iterate_batches(examples, epoch=0, start=4, **kw))
    assert len(resumed) == 2
    for a, b in zip(resumed, epoch0[4:], strict=True):
        for key in ("input_ids", "attention_mask", "labels"):
            assert np.array_equal(a[key], b[key])
    assert list(iterate_batches(examples, epoch=0, start=6, **kw)) == []
    with pytest.raises(ValueError, match="start"):
        list(iterate_batches(examples, epoch=0, start=7, **kw))


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON"),
    ({"instruction": "i"}, "JSON list"),
    ([], "no records"),
    ([{"instruction": "i"}], "record 0: 'output' must be a string \\(missing\\)"),
    ([{"instruction": "i", "output": "o"}, {"instruction": 3, "output": "o"}],
     "record 1: 'instruction' must be a string \\(int\\)"),
    ([{"instruction": "i", "output": "o", "input": 5}], "'input'"),
    (["text"], "record 0 is a str"),
])
def test_load_alpaca_rejects_bad_files(tmp_path, content, message):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=message) as info:
        load_alpaca(path)
    assert "bad.json" in str(info.value) and "\n" not in str(info.value)


def test_load_alpaca_normalizes_records(tmp_path):
    path = _write(tmp_path / "ok.json", [
        {"instruction": "i", "input": None, "output": " o", "history": [["q", "a"]]},
        {"instruction": "j", "output": ""},
    ])
    assert load_alpaca(path) == [{"instruction": "i", "input": "", "output": " o"},
                                 {"instruction": "j", "input": "", "output": ""}]
    with pytest.raises(DataError, match="cannot read"):
        load_alpaca(tmp_path / "missing.json")


def test_resolve_dataset(tmp_path):
    rec = [{"instruction": "i", "output": "o"}]
    _write(tmp_path / "alpha.json", rec)
    assert resolve_dataset("alpha", tmp_path) == tmp_path / "alpha.json"
    assert resolve_dataset("alpha.json", tmp_path) == tmp_path / "alpha.json"
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "b_file.json", rec)
    _write(tmp_path / "dataset_info.json", {"beta": {"file_name": "sub/b_file.json"},
                                            "gamma": {"file_name": "nowhere.json"}})
    assert resolve_dataset("beta", tmp_path) == tmp_path / "sub" / "b_file.json"
    with pytest.raises(DataError, match="missing file"):
        resolve_dataset("gamma", tmp_path)
    with pytest.raises(DataError, match="unknown dataset 'delta'; available: alpha, beta, gamma"):
        resolve_dataset("delta", tmp_path)


def test_replay_set_pools_datasets_with_stats(tmp_path, toks):
    _write(tmp_path / "a.json", [{"instruction": f"i{k}", "output": " x: y"} for k in range(5)])
    _write(tmp_path / "b.json", [{"instruction": "j" * 200, "input": "z", "output": " r: s"}] * 3)
    replay = ReplaySet.load(["a", "b"], tmp_path, toks["llama3"], "llama3", cutoff_len=128)
    assert len(replay) == 8 and [e.source for e in replay.examples] == ["a"] * 5 + ["b"] * 3
    assert replay.stats["a"]["n"] == 5 and replay.stats["b"]["n"] == 3
    assert replay.stats["a"]["n_truncated"] == 0 and replay.stats["b"]["n_truncated"] == 3
    assert replay.stats["b"]["max_len"] == 128
    assert replay.totals["n"] == 8 and replay.totals["n_truncated"] == 3
    assert "(all)" in replay.summary()
    with pytest.raises(DataError, match="listed twice: a"):
        ReplaySet.load(["a", "a"], tmp_path, toks["llama3"], "llama3", 128)


def test_load_alpaca_reads_jsonl_with_history(tmp_path):
    lines = [json.dumps({"instruction": "i", "input": "x", "output": " o", "history": []}), "",
             json.dumps({"instruction": "j", "output": " p"})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    assert load_alpaca(path) == [{"instruction": "i", "input": "x", "output": " o"},
                                 {"instruction": "j", "input": "", "output": " p"}]
    assert resolve_dataset("d", tmp_path) == path
    with pytest.raises(DataError, match=r"d2\.jsonl: line 2: invalid JSON"):
        load_alpaca(_write(tmp_path / "d2.jsonl", lines[0] + "\n{oops\n"))
    with pytest.raises(DataError, match=r"d3\.jsonl: record 1: 'output' must be a string"):
        no_output = json.dumps({"instruction": "i"})
        load_alpaca(_write(tmp_path / "d3.jsonl", f"{lines[0]}\n{no_output}"))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_replay_refuses_an_empty_output_by_file_and_record(tmp_path, toks, suffix):
    recs = [{"instruction": "a", "output": " x"}, {"instruction": "b", "output": " y"},
            {"instruction": "c", "output": "  "}]
    text = json.dumps(recs) if suffix == ".json" else "\n".join(json.dumps(r) for r in recs)
    _write(tmp_path / f"e{suffix}", text)
    with pytest.raises(DataError, match=rf"e{suffix}: record 2: 'output' is empty") as e:
        ReplaySet.load(["e"], tmp_path, toks["llama3"], "llama3", 128)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="record 2: 'output' is empty"):
        load_alpaca(tmp_path / f"e{suffix}", nonempty_output=True)


def test_dataset_role_parse():
    assert DatasetRole.parse("main") == DatasetRole("main")
    assert DatasetRole.parse("replay:all") == DatasetRole("replay", None)
    assert DatasetRole.parse("replay:0.5") == DatasetRole("replay", 0.5)
    assert str(DatasetRole.parse("replay:ALL")) == "replay:all"
    for bad in ("replay", "main:1", "extra", "replay:lots"):
        with pytest.raises(ValueError):
            DatasetRole.parse(bad)
    assert replay_count(0.5, 301, 1000) == 150 and replay_count(0.29, 100, 1000) == 28  # floor
    assert replay_count(3.0, 10, 12) == 12 and replay_count(None, 10, 7) == 7


def _mix_files(root: Path) -> None:
    _write(root / "m1.json", [{"instruction": f"m1-{k}", "output": " a"} for k in range(6)])
    _write(root / "m2.jsonl", "\n".join(json.dumps({"instruction": f"m2-{k}", "output": " b"})
                                         for k in range(4)))
    _write(root / "r.json", [{"instruction": f"r-{k}", "output": " c"} for k in range(40)])
    _write(root / "s.json", [{"instruction": f"s-{k}", "output": " d"} for k in range(3)])


def _instructions(replay: ReplaySet, tok, source: str) -> list[str]:
    return [tok.decode(ex.input_ids.tolist()) for ex in replay.examples if ex.source == source]


def test_replay_ratio_samples_floor_ratio_times_all_mains_seeded(tmp_path, toks):
    _mix_files(tmp_path)
    tok = toks["llama3"]

    def load(seed: int, ratio: str = "0.75") -> ReplaySet:
        # The replay is listed first: mains are still concatenated first.
        return ReplaySet.load(["r", "m1", "m2", "s"], tmp_path, tok, "llama3", 128,
                              roles=[f"replay:{ratio}", "main", "main", "replay:all"], seed=seed)

    a = load(42)
    # 10 main records (6 + 4): int(0.75 * 10) = 7 of r's 40; all 3 of s.
    assert [ex.source for ex in a.examples] == ["m1"] * 6 + ["m2"] * 4 + ["r"] * 7 + ["s"] * 3
    assert a.usage == {"m1": ("main", 6, 6), "m2": ("main", 4, 4), "r": ("replay:0.75", 40, 7),
                       "s": ("replay:all", 3, 3)}
    assert a.stats["r"]["n"] == 7 and len(a) == 20
    assert _instructions(a, tok, "r") == _instructions(load(42), tok, "r")  # same seed
    assert _instructions(a, tok, "r") != _instructions(load(7), tok, "r")  # other seed
    assert len(set(_instructions(a, tok, "r"))) == 7  # without replacement
    assert _instructions(load(42, "all"), tok, "r") == _instructions(load(3, "9"), tok, "r")
    assert len(_instructions(load(42, "all"), tok, "r")) == 40  # all / more than there is
    summary = a.summary()
    assert "replay:0.75" in summary and " 40     7 " in summary
    idx = sample_indices(40, 7, 42, "r")
    assert list(idx) == sorted(set(idx.tolist())) and len(idx) == 7


def test_plain_datasets_list_pools_every_record_in_order(tmp_path, toks):
    _mix_files(tmp_path)
    replay = ReplaySet.load(["s", "m1"], tmp_path, toks["llama3"], "llama3", 128)
    assert [ex.source for ex in replay.examples] == ["s"] * 3 + ["m1"] * 6
    assert replay.usage == {"s": ("pooled", 3, 3), "m1": ("pooled", 6, 6)}


@pytest.mark.parametrize("roles, problem", [
    ((), None),
    (("main", "replay:0.5"), None),
    (("main", "replay:all"), None),
    (("replay:all", "replay:0.5"), "data.roles=('replay:all', 'replay:0.5'): at least one"),
    (("main", "replay:0"), "data.roles.1='replay:0': the replay ratio must be a number > 0"),
    (("main", "replay:nan"), "data.roles.1='replay:nan': the replay ratio must be"),
    (("main", "mix"), "data.roles.1='mix': must be main, replay:all or replay:<ratio>"),
    (("main",), "data.roles=('main',): needs one entry per dataset (2 in data.datasets, 1"),
])
def test_data_spec_holds_the_role_rules(roles, problem):
    spec = DataSpec(data_root="d", datasets=("a", "b"), roles=roles)
    problems = spec.check(check_paths=False)
    if problem is None:
        assert problems == [] and len(spec.parsed_roles()) == len(roles)
    else:
        assert len(problems) == 1 and problems[0].startswith(problem), problems


# --------------------------------------------------------------------------------------------
# the real replay files (shared/data), when present
# --------------------------------------------------------------------------------------------
needs_uie = pytest.mark.skipif(not UIE_DIR.is_dir(), reason="shared/data/uie_sample300 absent")


@needs_uie
def test_real_replay_files_load_and_every_answer_parses():
    for name, kind in UIE_FILES.items():
        records = load_alpaca(resolve_dataset(name, UIE_DIR))
        assert len(records) == 300, name
        for rec in records:
            assert rec["input"] and rec["output"].startswith(" ")
            tuples = parse_uie(rec["output"], kind="re" if kind == "re" else "ner")
            assert tuples or rec["output"].strip() == "None", (name, rec["output"])
            assert all(len(t) == (3 if kind == "re" else 2) for t in tuples)


@needs_uie
def test_real_replay_set_tokenizes_within_cutoff(toks):
    replay = ReplaySet.load(list(UIE_FILES), UIE_DIR, toks["qwen"], "qwen", cutoff_len=1024)
    assert len(replay) == 1800 and replay.totals["n"] == 1800
    assert {name: int(s["n"]) for name, s in replay.stats.items()} == dict.fromkeys(UIE_FILES, 300)
    end = toks["qwen"].convert_tokens_to_ids("<|im_end|>")
    for ex in replay.examples:
        assert len(ex) <= 1024 and ex.n_supervised > 0
        supervised = ex.labels[ex.labels != IGNORE_INDEX]
        assert np.array_equal(supervised, ex.input_ids[len(ex) - supervised.size:])
    untruncated = [ex for ex in replay.examples if len(ex) < 1024]
    assert untruncated and all(ex.input_ids[-1] == end for ex in untruncated)
