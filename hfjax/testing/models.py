"""Tiny base models of three families of different shapes, built in JAX, and random LoRAs.

Each base model is saved as an ordinary HF checkpoint directory (config.json + safetensors +
a tokenizer trained with `tokenizers`) through our own exporter, so transformers, PEFT and
`hfjax.from_pretrained` all load it. Shapes differ on purpose (depth, width, GQA layout,
vocabulary), as a Llama-3-8B target and Qwen2.5-7B / Mistral-7B sources do::

    llama   4 layers, hidden 64, 4 heads / 2 kv heads, vocab 512
    qwen2   3 layers, hidden 48, 4 heads / 1 kv head (q/k/v biases)
    mistral 5 layers, hidden 40, 4 heads / 4 kv heads, sliding window 64
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bridge import LoraAdapter, LoraModule, make_adapter_config
from hfjax.loading import init_params, save_pretrained
from hfjax.models import Decoder, ModelConfig
from hfjax.models.decoder import module_names
from hfjax.models.families import ALL_LINEAR

__all__ = ["ALL_LINEAR", "DEFAULT_SHAPES", "FamilyShape", "build_base_model", "model_config",
           "random_lora"]


@dataclasses.dataclass(frozen=True)
class FamilyShape:
    family: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int
    sliding_window: int | None = None
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (SmolLM2, small Qwen2s)


DEFAULT_SHAPES = {
    "llama": FamilyShape("llama", 4, 64, 4, 2, 128, 512),
    "qwen2": FamilyShape("qwen2", 3, 48, 4, 1, 96, 640),
    "mistral": FamilyShape("mistral", 5, 40, 4, 4, 80, 384, sliding_window=64),
}


def model_config(shape: FamilyShape, tokenizer: Any) -> ModelConfig:
    vocab = max(shape.vocab_size, len(tokenizer))
    eos = tokenizer.eos_token_id
    return ModelConfig(
        model_type=shape.family, vocab_size=vocab, hidden_size=shape.hidden,
        intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads, rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=2048, tie_word_embeddings=shape.tie_embeddings,
        qkv_bias=shape.family == "qwen2",
        sliding_windows=(shape.sliding_window,) * shape.layers,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id)


def build_base_model(out_dir: str | Path, shape: FamilyShape, tokenizer: Any, *, seed: int = 0,
                     params: Any = None) -> Decoder:
    """Save a (random or given) model of ``shape`` with ``tokenizer`` as an HF checkpoint."""
    cfg = model_config(shape, tokenizer)
    if params is None:
        params = init_params(cfg, jax.random.PRNGKey(seed), jnp.float32)
    dec = Decoder(config=cfg, params=params)
    save_pretrained(dec, out_dir)
    tokenizer.save_pretrained(out_dir)
    return Decoder(config=cfg, params=params, path=str(out_dir))


def random_lora(cfg: ModelConfig, *, r: int = 8, alpha: float = 16, seed: int = 0,
                target_modules: Sequence[str] = ALL_LINEAR, b_std: float = 0.02,
                layers: Iterable[int] | None = None, base_model: str = "") -> LoraAdapter:
    """A LoRA with PEFT-like A (Kaiming-uniform-ish) and a non-zero random B."""
    rng = np.random.default_rng(seed)
    keep = set(layers) if layers is not None else None
    mods = {}
    for name, (d_in, d_out) in module_names(cfg).items():
        kind = name.rsplit(".", 1)[-1]
        layer = int(name.split(".")[2])
        if kind not in target_modules or (keep is not None and layer not in keep):
            continue
        bound = 1.0 / np.sqrt(d_in)
        A = rng.uniform(-bound, bound, size=(r, d_in)).astype(np.float32)
        B = (b_std * rng.standard_normal((d_out, r))).astype(np.float32)
        mods[name] = LoraModule(name=name, A=A, B=B, scale=alpha / r)
    config = make_adapter_config(r=r, lora_alpha=alpha, target_modules=list(target_modules),
                                 base_model_name_or_path=base_model)
    return LoraAdapter(config=config, modules=mods)
