"""LoRA parity with PEFT: PeftModel logits vs ours for the same adapter (float32, <= 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import hfjax  # noqa: E402
from bridge import load_adapter, save_adapter  # noqa: E402
from hfjax.testing.hf_models import load_hf_model, make_hf_model, make_peft_adapter, torch_logits  # noqa: E402

ADAPTERS = {
    "plain": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "mistral_window": ("mistral", {}),
    "rslora": ("llama", {"use_rslora": True}),
    "patterns": ("llama", {"rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
                           "alpha_pattern": {"q_proj": 3, "gate_proj": 32}}),
    "attn_only_layer1": ("qwen2", {"target_modules": ["q_proj", "v_proj"],
                                   "layers_to_transform": [1]}),
    "qwen3_rslora": ("qwen3", {"use_rslora": True}),
    "gemma2_rslora": ("gemma2", {"use_rslora": True}),
    "gemma3_text_rslora": ("gemma3_text", {"use_rslora": True}),
    "olmo2_rslora": ("olmo2", {"use_rslora": True}),
}
MODEL_KW = {"mistral": {"sliding_window": 4}}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def adapter_case(request, tmp_path_factory):
    family, kw = ADAPTERS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = make_hf_model(family, root / "base", seed=2, **MODEL_KW.get(family, {}))
    adapter = make_peft_adapter(base, root / "lora", seed=3, **kw)
    return request.param, base, adapter


def _peft_logits(base_dir, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(load_hf_model(base_dir), str(adapter_dir)).eval()
    return torch_logits(model, ids)


def test_lora_logits_match_peft(adapter_case):
    name, base, adapter_dir = adapter_case
    ours = hfjax.from_pretrained(base, dtype="float32")
    adapter = load_adapter(adapter_dir)
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 10))
    got = np.asarray(ours(ids, adapter=adapter))
    ref = _peft_logits(base, adapter_dir, ids)
    err = np.abs(got - ref).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err:.2e}"
    base_logits = np.asarray(ours(ids))
    assert np.abs(got - base_logits).max() > 1e-3, f"{name}: the LoRA changes nothing"


def test_export_round_trip_in_peft(adapter_case, tmp_path):
    name, base, adapter_dir = adapter_case
    adapter = load_adapter(adapter_dir)
    out = save_adapter(adapter, tmp_path / "exported")
    again = load_adapter(out)
    for mod, m in adapter.modules.items():
        np.testing.assert_array_equal(again.modules[mod].A, m.A)
        np.testing.assert_array_equal(again.modules[mod].B, m.B)
        assert again.modules[mod].scale == m.scale
    # PEFT loads every tensor bit-exactly and computes the same function.
    pm = peft.PeftModel.from_pretrained(load_hf_model(base), str(out)).eval()
    state = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    assert len(state) == 2 * len(adapter.modules)
    for key, tensor in state.items():
        mod = key.split("base_model.model.", 1)[1].split(".lora_")[0]
        which = "A" if ".lora_A." in key else "B"
        np.testing.assert_array_equal(tensor.numpy(), getattr(adapter.modules[mod], which))
    ids = np.arange(4, 16)[None]
    np.testing.assert_allclose(torch_logits(pm, ids), _peft_logits(base, adapter_dir, ids),
                               atol=1e-6, rtol=0)
