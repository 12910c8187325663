"""Logit parity with transformers for every target family (float32, <= 1e-4).

The newer families' tiny shapes come from `hf_fixtures.FAMILY_DEFAULTS`: head_dim != D / H,
Gemma's query_pre_attn_scalar != head_dim and a sliding window (4) shorter than the sequences,
Gemma 2's soft-capping, Gemma 3's linear-scaled global and separate local RoPE bases.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import hfjax  # noqa: E402
from hfjax.testing.hf_models import load_hf_model, make_hf_model, torch_logits  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
               "rope_theta": 500000.0}

CASES = {
    "llama_gqa2": ("llama", {}),
    "llama_mha_tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama_mqa": ("llama", {"num_key_value_heads": 1}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE, "max_position_embeddings": 64}),
    "llama_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "qwen2": ("qwen2", {}),
    "qwen2_tied_mqa": ("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    "mistral_window3": ("mistral", {"sliding_window": 3}),
    "mistral_nowindow": ("mistral", {"sliding_window": None, "head_dim": 16}),
    "qwen3": ("qwen3", {}),
    "qwen3_window_mqa": ("qwen3", {"num_key_value_heads": 1, "use_sliding_window": True,
                                   "sliding_window": 3, "max_window_layers": 1}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "olmo2": ("olmo2", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    family, kw = CASES[request.param]
    d = make_hf_model(family, tmp_path_factory.mktemp(request.param), seed=1, **kw)
    return request.param, d


def test_logits_match_transformers(case):
    name, d = case
    ref_model = load_hf_model(d)
    ours = hfjax.from_pretrained(d, dtype="float32")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 11))
    err = np.abs(np.asarray(ours(ids)) - torch_logits(ref_model, ids)).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err:.2e}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_masks_match(case, side):
    name, d = case
    ref_model = load_hf_model(d)
    ours = hfjax.from_pretrained(d, dtype="float32")
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 96, size=(3, 9))
    mask = np.ones_like(ids)
    if side == "right":
        mask[1, 6:] = 0
        mask[2, 3:] = 0
    else:
        mask[1, :3] = 0
        mask[2, :5] = 0
    ids = np.where(mask == 1, ids, 0)
    ref = torch_logits(ref_model, ids, mask)
    got = np.asarray(ours(ids, attention_mask=mask))
    err = np.abs(got - ref)[mask == 1].max()
    assert err <= 1e-4, f"{name} {side} padding: max abs logit error {err:.2e}"


def test_bfloat16_runs_close(case):
    _, d = case
    ours32 = hfjax.from_pretrained(d, dtype="float32")
    ours16 = hfjax.from_pretrained(d, dtype="bfloat16")
    assert ours16.params["embed"].dtype.name == "bfloat16"
    ids = np.arange(3, 15)[None]
    a, b = np.asarray(ours32(ids)), np.asarray(ours16(ids))
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.1 * (np.abs(a).max() + 1)


def test_greedy_generation_matches_transformers(case):
    name, d = case
    ref_model = load_hf_model(d)
    ours = hfjax.from_pretrained(d, dtype="float32")
    ids = np.array([[5, 17, 33, 8, 41, 9]])
    with torch.no_grad():
        ref = ref_model.generate(torch.as_tensor(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=2, pad_token_id=0).numpy()
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    np.testing.assert_array_equal(got, ref, err_msg=name)


def test_batched_left_padded_generation_matches_transformers(case):
    name, d = case
    ref_model = load_hf_model(d)
    ours = hfjax.from_pretrained(d, dtype="float32")
    ids = np.array([[0, 0, 5, 17, 33, 8], [12, 4, 50, 60, 7, 9]])
    mask = (np.arange(6)[None] >= np.array([[2], [0]])).astype(np.int64)
    with torch.no_grad():
        ref = ref_model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                 max_new_tokens=8, do_sample=False, eos_token_id=2,
                                 pad_token_id=0).numpy()
    got = ours.generate(ids, max_new_tokens=8, attention_mask=mask, eos_token_id=2,
                        pad_token_id=0)
    np.testing.assert_array_equal(got, ref, err_msg=name)


def test_loading_trims_the_heap_by_bytes_not_per_tensor(case, monkeypatch):
    """malloc_trim walks the whole heap: small models must not pay it once per tensor."""
    import hfjax.loading as loading

    name, d = case
    calls: list[int] = []
    monkeypatch.setattr(loading, "release_free_heap", lambda: calls.append(1))
    ref = loading.from_pretrained(d, dtype="float32")
    assert calls == []  # a tiny model stays under one trim's worth of bytes
    n_tensors = len(jax.tree.leaves(ref.params))
    monkeypatch.setattr(loading, "_TRIM_EVERY", 1)
    again = loading.from_pretrained(d, dtype="float32")
    assert len(calls) == n_tensors  # every tensor crosses a 1-byte threshold
    chex.assert_trees_all_equal(ref.params, again.params)


def test_export_round_trip_in_transformers(case, tmp_path):
    """Key table both directions: HF -> ours -> HF is bit-exact and reloads as the same model."""
    import transformers

    from hfjax.loading import save_pretrained
    from hfjax.models.families import family

    name, d = case
    ours = hfjax.from_pretrained(d, dtype="float32")
    out = save_pretrained(ours, tmp_path / "exported")
    ref, back = load_hf_model(d), load_hf_model(out)
    assert type(back).__name__ == family(ours.config.model_type).architecture
    assert isinstance(back.config, transformers.AutoConfig.for_model(
        ours.config.model_type).__class__)
    state, new_state = ref.state_dict(), back.state_dict()
    assert state.keys() == new_state.keys(), name
    for key, value in state.items():
        assert torch.equal(value, new_state[key]), f"{name}: {key}"
    again = hfjax.from_pretrained(out, dtype="float32")
    assert again.config == ours.config
    chex.assert_trees_all_equal(again.params, ours.params)


def test_stacked_layers_match_transformers(case, tmp_path):
    """The scanned layout (``from_pretrained(stacked=True)``): logits vs transformers, greedy
    generation as the list layout, and export from the stacked arrays is bit-exact."""
    from hfjax.loading import save_pretrained
    from hfjax.models.decoder import is_stacked

    name, d = case
    ref_model = load_hf_model(d)
    listed = hfjax.from_pretrained(d, dtype="float32")
    ours = hfjax.from_pretrained(d, dtype="float32", stacked=True)
    assert is_stacked(ours.params) and not is_stacked(listed.params)
    n = ours.config.num_hidden_layers
    assert ours.params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == n
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 96, size=(2, 11))
    err = np.abs(np.asarray(ours(ids)) - torch_logits(ref_model, ids)).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err:.2e}"
    np.testing.assert_array_equal(np.asarray(ours.generate(ids[:, :5], 4)),
                                  np.asarray(listed.generate(ids[:, :5], 4)))
    out = save_pretrained(ours, tmp_path / "exported")
    state, new_state = ref_model.state_dict(), load_hf_model(out).state_dict()
    assert state.keys() == new_state.keys(), name
    for key, value in state.items():
        assert torch.equal(value, new_state[key]), f"{name}: {key}"
