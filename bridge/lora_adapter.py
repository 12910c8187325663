"""In-memory LoRA adapter: what `bridge.load_adapter` returns and `bridge.save_adapter` writes.

A PEFT file stores, per adapted module, two tensors::

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   (r, d_in)
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   (d_out, r)

We hold them as one `LoraModule` per module, named by the module path without PEFT's
``base_model.model.`` prefix and without an adapter name (``model.layers.3.self_attn.q_proj``),
with the per-module scale already resolved (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA,
honouring ``rank_pattern`` / ``alpha_pattern``). Tensors keep their original numpy dtype
(bf16 via ``ml_dtypes``), so load -> save is bit-exact.

``adapter.to_jax()`` gives the pytree the model's pure forward takes::

    {"model.layers.3.self_attn.q_proj": {"A": (r, d_in), "B": (d_out, r), "scale": ()}, ...}
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: ``ΔW = scale · B @ A``."""

    name: str  # module path, e.g. "model.layers.3.self_attn.q_proj"
    A: np.ndarray  # (r, d_in), original dtype
    B: np.ndarray  # (d_out, r), original dtype
    scale: float  # lora_alpha / r (or / sqrt(r) with rsLoRA), per module
    # For one part of a split fused projection (bridge.fused_split): the fused module's
    # suffix and the B rows taken, e.g. "self_attn.qkv_proj rows 0:3072"; "" otherwise.
    origin: str = ""

    @property
    def layer(self) -> int | None:
        m = _LAYER_RE.search(self.name + ".")
        return int(m.group(1)) if m else None

    @property
    def module_type(self) -> str:
        """The projection name: q_proj, k_proj, ..., down_proj."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def suffix(self) -> str:
        """Path after ``layers.{l}.``, e.g. ``self_attn.q_proj`` (docs/algorithm.md §2)."""
        m = _LAYER_RE.search(self.name + ".")
        return self.name[m.end():] if m else self.name

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])


def _module_sort_key(name: str) -> tuple[int, str]:
    m = _LAYER_RE.search(name + ".")
    return (int(m.group(1)) if m else -1, name)


@dataclasses.dataclass
class LoraAdapter:
    """A whole PEFT LoRA adapter. ``modules`` is ordered by (layer index, module path)."""

    config: dict[str, Any]  # adapter_config.json as read (PEFT field names)
    modules: dict[str, LoraModule]
    path: str | None = None  # where it was read from, for error messages

    def __post_init__(self) -> None:
        self.modules = {k: self.modules[k] for k in sorted(self.modules, key=_module_sort_key)}

    @property
    def num_layers(self) -> int:
        """1 + the largest layer index among the adapted modules (docs/algorithm.md §2's L)."""
        layers = [m.layer for m in self.modules.values() if m.layer is not None]
        return 1 + max(layers) if layers else 0

    def to_jax(self, dtype: Any = None) -> dict[str, dict[str, Any]]:
        """The adapter pytree of the pure forward (A, B cast to ``dtype`` if given)."""
        import jax.numpy as jnp

        out = {}
        for name, m in self.modules.items():
            out[name] = {
                "A": jnp.asarray(m.A, dtype=dtype),
                "B": jnp.asarray(m.B, dtype=dtype),
                "scale": jnp.asarray(m.scale, dtype=jnp.float32),
            }
        return out

    def with_B(self, new_B: Mapping[str, Any], *, keep_dtype: bool = True) -> LoraAdapter:
        """A copy whose listed modules get new B matrices (others are shared, unchanged)."""
        mods = dict(self.modules)
        for name, b in new_B.items():
            old = mods[name]
            b = np.asarray(b)
            if b.shape != old.B.shape:
                raise ValueError(f"{name}: new B has shape {b.shape}, expected {old.B.shape}")
            mods[name] = dataclasses.replace(old, B=b.astype(old.B.dtype) if keep_dtype else b)
        return LoraAdapter(config=dict(self.config), modules=mods, path=None)
