"""PEFT adapter folders shaped like Gemma 2, OLMo 2 and Phi-3 experts (tests only).

Written straight with safetensors and json (not with `bridge.save_adapter`), with the key
names and adapter_config.json fields PEFT writes for those families, so that reading them
tests our reader rather than our writer. Shapes are tiny but keep each family's quirks:
Gemma 2's head_dim makes q_proj wider than the hidden size; Phi-3 fuses q/k/v and gate/up.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

# family -> layers, hidden, heads, kv_heads, head_dim, intermediate, HF model id
FAMILIES = {
    "gemma2": (3, 24, 2, 1, 16, 48, "google/gemma-2-2b-it"),
    "olmo2": (5, 16, 2, 2, 8, 40, "allenai/OLMo-2-1124-7B-Instruct"),
    "phi3": (6, 16, 4, 2, 4, 40, "microsoft/Phi-4-mini-instruct"),  # GQA: qkv 16 + 8 + 8
    "phi3mini": (4, 16, 4, 4, 4, 40, "microsoft/Phi-3-mini-4k-instruct"),  # MHA: 3 x 16
}


def module_shapes(family: str) -> dict[str, tuple[int, int]]:
    """``suffix -> (d_in, d_out)`` of one decoder layer, as the family's HF model has it."""
    _, hidden, heads, kv, hd, inter, _ = FAMILIES[family]
    q, k = heads * hd, kv * hd
    if family.startswith("phi3"):
        return {"self_attn.qkv_proj": (hidden, q + 2 * k), "self_attn.o_proj": (q, hidden),
                "mlp.gate_up_proj": (hidden, 2 * inter), "mlp.down_proj": (inter, hidden)}
    return {"self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, k),
            "self_attn.v_proj": (hidden, k), "self_attn.o_proj": (q, hidden),
            "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
            "mlp.down_proj": (inter, hidden)}


def hf_config(family: str) -> dict:
    """The head-layout part of the family's config.json."""
    layers, hidden, heads, kv, hd, inter, _ = FAMILIES[family]
    model_type = "phi3" if family.startswith("phi3") else family
    return {"model_type": model_type, "num_hidden_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
            **({"head_dim": hd} if family == "gemma2" else {})}


def write_expert(root: Path, family: str, *, r: int = 4, seed: int = 0,
                 adapter_name: str | None = None, dtype=np.float32) -> Path:
    """A PEFT LoRA folder of ``family`` with random non-zero factors; returns its path."""
    layers, *_, hf_id = FAMILIES[family]
    rng = np.random.default_rng(seed)
    shapes = module_shapes(family)
    tensors = {}
    name = f".{adapter_name}" if adapter_name else ""
    for layer in range(layers):
        for suffix, (d_in, d_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{suffix}"
            tensors[f"{key}.lora_A{name}.weight"] = (
                rng.uniform(-1, 1, (r, d_in)) / np.sqrt(d_in)).astype(dtype)
            tensors[f"{key}.lora_B{name}.weight"] = (0.05 * rng.standard_normal(
                (d_out, r))).astype(dtype)
    out = root / f"{family}_expert"
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": hf_id,
        "r": r, "lora_alpha": 2 * r, "lora_dropout": 0.05, "bias": "none",
        "target_modules": sorted(s.rsplit(".", 1)[-1] for s in shapes),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
        "init_lora_weights": True, "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def write_config(root: Path, family: str, **overrides) -> Path:
    """The source base model's config.json (only its head layout), in its own folder."""
    out = root / f"{family}_base"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**hf_config(family), **overrides}))
    return out


BF16 = ml_dtypes.bfloat16
