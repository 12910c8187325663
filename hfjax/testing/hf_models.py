"""Tiny random transformers models and PEFT adapters saved to directories, and their logits.

Needs torch, transformers and peft (``pip install torch==2.13.0 'hfjax[torch]'``); each
function imports them when called and says so in one line if they are missing::

    base = make_hf_model("qwen2", tmp / "base", seed=1)          # config.json + safetensors
    lora = make_peft_adapter(base, tmp / "lora", r=4, seed=2)    # a PEFT dir, B != 0
    logits = torch_logits(load_hf_model(base), ids)              # (batch, seq, vocab) numpy
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from hfjax.models.families import ALL_LINEAR as _ALL_LINEAR

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=96, max_position_embeddings=128)

# Tiny-shape settings per family: a head_dim other than hidden / heads where the family
# allows one, and (Gemma) a scalar that is not head_dim and a short window.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4,
               "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 12, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                           "rope_theta": 100000.0},
                                        "sliding_attention": {"rope_type": "default",
                                                              "rope_theta": 1000.0}}},
}

ALL_LINEAR = list(_ALL_LINEAR)  # PEFT target_modules want a list


def _require(name: str) -> ModuleType:
    """``import name``, or one ImportError line saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"hfjax.testing.hf_models needs {name}: "
                          "pip install torch==2.13.0 'hfjax[torch]'") from e


def make_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a random tiny HF model of ``family``, save it (safetensors), return its dir."""
    torch, transformers = _require("torch"), _require("transformers")
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
           "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
           "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM)}[family]
    kw = {**TINY, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
          **FAMILY_DEFAULTS.get(family, {}), **overrides}
    config = cls[0](**kw)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    # Make norms non-trivial so a wrong norm weight cannot pass unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def load_hf_model(path: Path) -> Any:
    """The transformers model in ``path``, float32, eager attention, eval mode."""
    _require("torch")
    transformers = _require("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype="float32", attn_implementation="eager").eval()


def make_peft_adapter(base_dir: Path, out_dir: Path, *, r: int = 4, alpha: int = 8,
                      target_modules: list[str] | None = None, seed: int = 0,
                      **lora_kw: Any) -> Path:
    """A PEFT LoRA with non-zero random A and B for the model in ``base_dir``."""
    peft, torch = _require("peft"), _require("torch")
    torch.manual_seed(seed)
    model = load_hf_model(base_dir)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules or ALL_LINEAR),
                          init_lora_weights=False, task_type="CAUSAL_LM", **lora_kw)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # larger B so the LoRA visibly changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
    pm.save_pretrained(out_dir)
    return Path(out_dir)


def torch_logits(model: Any, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``model``'s float32 logits for ``ids`` (and ``mask``), as numpy."""
    torch = _require("torch")

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()
