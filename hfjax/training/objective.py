"""The LM objective: mean token cross-entropy over supervised (response) tokens, HF-style shift."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from hfjax.models.config import ModelConfig
from hfjax.models.decoder import Adapter, forward

IGNORE_INDEX = -100


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed NLL and number of supervised tokens (``logits[:, t]`` predicts ``labels[:, t+1]``)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def lm_loss(params: dict[str, Any], cfg: ModelConfig, batch: dict[str, jax.Array],
            adapter: Adapter | None, *, remat: bool = False,
            stacked_lora: dict[str, Any] | None = None) -> jax.Array:
    """Mean cross-entropy over the batch's supervised tokens (0 when there are none).
    ``stacked_lora``: `forward`'s (the adapter already in the scanned layout)."""
    logits, _ = forward(params, cfg, batch["input_ids"], batch["attention_mask"], adapter,
                        remat=remat, stacked_lora=stacked_lora)
    total, count = token_nll(logits, batch["labels"])
    return total / jnp.maximum(count, 1)
