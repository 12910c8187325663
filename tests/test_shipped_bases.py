"""The demo's shipped bases: their key matches `DEFAULT`, they are the weights their manifest
describes (a copy circuit included), and the lookup copies only on an exact key match."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from hfjax.demo import shipped
from hfjax.demo.pipeline import DEFAULT, FAMILIES, FULL, default_models_key
from hfjax.demo.pretrain import copy_nll
from hfjax.errors import UserError
from hfjax.loading import from_pretrained

MANIFEST = shipped.read_manifest()
needs_bases = pytest.mark.skipif(MANIFEST is None, reason="no bases shipped in hfjax/demo/bases")


@needs_bases
def test_shipped_key_matches_default() -> None:
    key = default_models_key()
    assert MANIFEST["key"] == key, (
        f"hfjax/demo/bases was built for key {MANIFEST['key']}, DEFAULT's models stage now has "
        f"key {key}: rebuild with `python scripts/build_demo_bases.py`")
    # --full trains its experts on more records but scores the same held-out inputs
    assert default_models_key(FULL) == key


@needs_bases
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_base_is_what_its_manifest_says(family: str) -> None:
    info = MANIFEST["info"][family]
    model = from_pretrained(shipped.BASES_DIR / family, jnp.float32)
    cfg = model.config
    shape = DEFAULT.shapes[family]
    assert cfg.model_type == family
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads) == (shape.layers, shape.hidden, shape.heads, shape.kv_heads)
    assert cfg.vocab_size == info["vocab"]
    assert (shipped.BASES_DIR / family / "tokenizer.json").is_file()
    # the recorded copy test, recomputed on the shipped weights (XLA:CPU may differ slightly)
    first, second = copy_nll(cfg, model.params, seq_len=DEFAULT.pretrain.seq_len)
    assert first == pytest.approx(info["copy_nll"][0], abs=0.05)
    assert second == pytest.approx(info["copy_nll"][1], abs=0.05)
    assert second < 0.5 * first, f"{family}: the shipped base does not copy"


def _fake_root(tmp_path: Path, key: str) -> Path:
    root = tmp_path / "bases"
    for fam in ("llama", "qwen2"):
        (root / fam).mkdir(parents=True)
        (root / fam / "config.json").write_text("{}")
    (root / "manifest.json").write_text(json.dumps({
        "key": key, "info": {f: {"copy_nll": [7.0, 0.1]} for f in ("llama", "qwen2")},
        "built": {"finished_at": "2026-12-02 01:00:00"}}))
    return root


def test_copy_shipped_copies_only_on_a_key_match(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, "abc")
    assert shipped.copy_shipped("other", ["llama"], tmp_path / "a", root) is None
    assert not (tmp_path / "a").exists()
    # a family the manifest lacks: nothing is copied
    assert shipped.copy_shipped("abc", ["llama", "mistral"], tmp_path / "b", root) is None
    assert not (tmp_path / "b").exists()
    got = shipped.copy_shipped("abc", ["llama", "qwen2"], tmp_path / "c", root)
    assert set(got) == {"llama", "qwen2"} and "shipped" in got["llama"]["source"]
    assert got["llama"]["copy_nll"] == [7.0, 0.1]
    assert (tmp_path / "c" / "qwen2" / "config.json").is_file()
    assert shipped.copy_shipped("abc", ["llama"], tmp_path / "d", tmp_path / "none") is None


def test_bad_manifest_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match=r"manifest\.json: not valid JSON"):
        shipped.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"key": "x"}')
    with pytest.raises(UserError, match=r"manifest\.json: .*needs 'key' and 'info'"):
        shipped.read_manifest(tmp_path)


def test_key_depends_on_settings_and_held_out_inputs() -> None:
    params = {"corpus_docs": 3000, "pretrain_steps": {"llama": 10}}
    key = shipped.bases_key(params, ["a", "b"])
    assert key == shipped.bases_key(dict(params), ["b", "a", "a"])  # a set of inputs
    assert key != shipped.bases_key({**params, "corpus_docs": 3001}, ["a", "b"])
    assert key != shipped.bases_key(params, ["a", "c"])
