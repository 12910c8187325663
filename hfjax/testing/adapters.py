"""Small random LoRA adapters with real module naming and no model behind them (numpy only).

Example::

    a = random_adapter(num_layers=4, hidden=24, intermediate=40, rank=4,
                       modules=("q_proj", "v_proj"), seed=0)
    list(a.modules)[:2]
    # ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    a.modules['model.layers.0.self_attn.v_proj'].B.shape   # (kv_dim, 4) = (24, 4)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bridge.lora_adapter import LoraAdapter, LoraModule


def module_shapes(hidden: int, intermediate: int, kv_dim: int | None = None
                  ) -> dict[str, tuple[str, int, int]]:
    """``module_type -> (suffix, d_in, d_out)`` of a Llama-like decoder layer."""
    kv = hidden if kv_dim is None else kv_dim
    return {
        "q_proj": ("self_attn.q_proj", hidden, hidden),
        "k_proj": ("self_attn.k_proj", hidden, kv),
        "v_proj": ("self_attn.v_proj", hidden, kv),
        "o_proj": ("self_attn.o_proj", hidden, hidden),
        "gate_proj": ("mlp.gate_proj", hidden, intermediate),
        "up_proj": ("mlp.up_proj", hidden, intermediate),
        "down_proj": ("mlp.down_proj", intermediate, hidden),
    }


def random_adapter(
    num_layers: int,
    hidden: int,
    intermediate: int,
    rank: int,
    *,
    modules: Sequence[str] = ("q_proj", "v_proj"),
    kv_dim: int | None = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    rank_overrides: dict[str, int] | None = None,
    path: str | None = None,
) -> LoraAdapter:
    """A LoRA adapter with N(0, 0.1) factors (B non-zero, unlike a fresh PEFT adapter).

    ``layers`` restricts which layers are adapted (default: all); ``rank_overrides`` maps a
    module_type to another rank (to provoke rank mismatches).
    """
    rng = np.random.default_rng(seed)
    shapes = module_shapes(hidden, intermediate, kv_dim)
    mods = {}
    for layer in (range(num_layers) if layers is None else layers):
        for mt in modules:
            suffix, d_in, d_out = shapes[mt]
            r = (rank_overrides or {}).get(mt, rank)
            name = f"model.layers.{layer}.{suffix}"
            mods[name] = LoraModule(
                name=name,
                A=(0.1 * rng.standard_normal((r, d_in))).astype(np.float32),
                B=(0.1 * rng.standard_normal((d_out, r))).astype(np.float32),
                scale=2.0,
            )
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(modules)}
    return LoraAdapter(config=config, modules=mods, path=path)
