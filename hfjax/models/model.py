"""`Decoder`: a loaded model (config + params) with a jitted forward and greedy `generate`."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import numpy as np

from hfjax.models.config import ModelConfig
from hfjax.models.decoder import Adapter, Params, check_adapter, forward
from hfjax.models.generate import greedy_generate


@partial(jax.jit, static_argnames=("cfg",))
def _logits(params: Params, cfg: ModelConfig, input_ids, attention_mask, adapter):
    return forward(params, cfg, input_ids, attention_mask, adapter)[0]


def as_adapter_tree(adapter: Any, cfg: ModelConfig, dtype: Any = None) -> Adapter:
    """Accept a `bridge.LoraAdapter` or an adapter pytree; check it fits the model."""
    if adapter is None:
        return {}
    where = "adapter"
    if hasattr(adapter, "to_jax"):
        where = str(getattr(adapter, "path", None) or "adapter")
        adapter = adapter.to_jax(dtype)
    check_adapter(adapter, cfg, where=where)
    return adapter


@dataclasses.dataclass
class Decoder:
    """A llama-like decoder: ``config`` (ModelConfig) and ``params`` (a pytree of jax arrays)."""

    config: ModelConfig
    params: Params
    path: str | None = None

    @property
    def dtype(self) -> Any:
        return self.params["embed"].dtype

    def __call__(self, input_ids: Any, attention_mask: Any = None,
                 adapter: Any = None) -> jax.Array:
        """Logits (B, T, vocab) in float32; ``adapter`` is a LoraAdapter or an adapter pytree."""
        ids = np.asarray(input_ids, np.int32)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        return _logits(self.params, self.config, ids, mask, as_adapter_tree(adapter, self.config))

    def generate(self, input_ids: Any, max_new_tokens: int, adapter: Any = None,
                 attention_mask: Any = None, *, eos_token_id: int | tuple[int, ...] | None = None,
                 pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with a KV cache; returns prompt + new tokens (B, T + n)."""
        eos = self.config.eos_ids if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        return greedy_generate(self.params, self.config, input_ids, attention_mask,
                               max_new_tokens, as_adapter_tree(adapter, self.config),
                               eos_ids=eos, pad_id=pad)
