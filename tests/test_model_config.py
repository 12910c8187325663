"""ModelConfig.from_hf for the newer families: deltas read, unsupported fields refused by name."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.sharding import PartitionSpec

from hfjax import sharding as shd
from hfjax.models.config import ModelConfig, ModelConfigError
from hfjax.models.families import FAMILIES, markdown_table
from hfjax.models.key_tables import key_table, logical_axes_tree
from hfjax.testing.hf_models import FAMILY_DEFAULTS, TINY

NEW = ("qwen3", "gemma2", "gemma3_text", "olmo2")


def _hf(model_type: str, **kw) -> dict:
    return {"model_type": model_type, **TINY, **FAMILY_DEFAULTS.get(model_type, {}), **kw}


def test_deltas_are_read_from_the_config():
    q3 = ModelConfig.from_hf(_hf("qwen3"))
    assert (q3.qk_norm, q3.head_dim, q3.qkv_bias, q3.layer_norms) == ("head", 16, False, "pre")
    g2 = ModelConfig.from_hf(_hf("gemma2"))
    assert (g2.norm_kind, g2.layer_norms, g2.embed_scale, g2.mlp_act) == (
        "gemma", "sandwich", True, "gelu_tanh")
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar) == (5.0, 3.0, 12.0)
    assert g2.sliding_windows == (4, None) and g2.tie_word_embeddings
    g3 = ModelConfig.from_hf(_hf("gemma3_text"))
    assert (g3.qk_norm, g3.attn_softcap, g3.rope_local_theta, g3.rope_theta) == (
        "head", None, 1000.0, 100000.0)
    assert g3.rope_linear_factor == 2.0
    # Old-style Gemma 3 fields are normalised by transformers into the per-layer-type dict.
    old = ModelConfig.from_hf(_hf("gemma3_text", rope_parameters=None, rope_theta=5e5,
                                  rope_local_base_freq=7e3))
    assert (old.rope_theta, old.rope_local_theta, old.rope_linear_factor) == (5e5, 7e3, 1.0)
    o2 = ModelConfig.from_hf(_hf("olmo2"))
    assert (o2.norm_kind, o2.layer_norms, o2.qk_norm) == ("f32", "post", "full")


@pytest.mark.parametrize("model_type", NEW)
def test_to_hf_dict_reads_back_the_same(model_type):
    cfg = ModelConfig.from_hf(_hf(model_type))
    d = cfg.to_hf_dict()
    assert d["architectures"] == [FAMILIES[model_type].architecture]
    assert ModelConfig.from_hf(d) == cfg


@pytest.mark.parametrize(("model_type", "kw", "message"), [
    ("gemma3", {}, r"vision tower\) is not supported.*gemma3_text"),
    ("qwen3_moe", {}, "Qwen3 MoE is not supported"),
    ("olmoe", {}, "OLMoE is not supported"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported for qwen3"),
    ("olmo2", {"attention_bias": True}, "attention_bias=True is not supported for olmo2"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu' is not supported"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3_text", {"rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "sliding_attention.rope_type 'linear' is not supported"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                   "original_max_position_embeddings": 64}},
     "rope type 'yarn' is not supported"),
    ("olmo2", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_fields_are_refused_by_name(model_type, kw, message):
    with pytest.raises(ModelConfigError, match=f"my/config.json: .*{message}"):
        ModelConfig.from_hf(_hf(model_type, **kw), source="my/config.json")


@pytest.mark.parametrize("model_type", NEW)
def test_key_table_axes_have_default_sharding_rules(model_type):
    from hfjax.configs.fuse import get_config

    cfg = ModelConfig.from_hf(_hf(model_type))
    names = {n for s in jax.tree.leaves(logical_axes_tree(cfg),
                                        is_leaf=lambda x: isinstance(x, PartitionSpec))
             for n in s}
    assert names <= set(shd.MODEL_PARAM_AXES)
    shd.check_rules(shd.rules_from_config(get_config().mesh.rules), names)
    hf_keys = [s.hf for s in key_table(cfg)]
    assert len(hf_keys) == len(set(hf_keys))
    if cfg.qk_norm:
        assert "model.layers.1.self_attn.k_norm.weight" in hf_keys
    if cfg.layer_norms == "post":
        assert not any("input_layernorm" in k for k in hf_keys)


def test_readme_lists_the_family_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
