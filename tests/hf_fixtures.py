"""Tiny random transformers models and PEFT adapters, saved to temp dirs (tests only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_hf_model(family: str, out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a random tiny HF model of ``family``, save it (safetensors), return its dir."""
    import torch
    import transformers

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


def load_hf_model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype="float32", attn_implementation="eager").eval()


def make_peft_adapter(base_dir: Path, out_dir: Path, *, r: int = 4, alpha: int = 8,
                      target_modules: list[str] | None = None, seed: int = 0,
                      **lora_kw: Any) -> Path:
    """A PEFT LoRA with non-zero random A and B for the model in ``base_dir``."""
    import peft
    import torch

    torch.manual_seed(seed)
    model = load_hf_model(base_dir)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ALL_LINEAR,
                          init_lora_weights=False, task_type="CAUSAL_LM", **lora_kw)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # larger B so the LoRA visibly changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(5.0)
    pm.save_pretrained(out_dir)
    return Path(out_dir)


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()
