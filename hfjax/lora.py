"""The LoRA-patched projection: ``y = x W (+ b) + scale · (x Aᵀ) Bᵀ``.

Shapes follow PEFT: ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``; our kernels are
``(d_in, d_out)``. The LoRA branch runs in the adapter's dtype (as PEFT casts the input to
``lora_A``'s dtype) and is added in the base output's dtype. Because ``B`` is an ordinary
argument, "dynamic patching" is just calling this with another ``B``, under `jax.jit` and
`jax.grad` alike.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# One module's adapter: {"A": (r, d_in), "B": (d_out, r), "scale": ()}.
LoraParams = dict[str, jax.Array]


def linear(x: jax.Array, p: dict[str, Any], lora: LoraParams | None = None) -> jax.Array:
    """A (possibly LoRA-patched) linear layer on the last axis of ``x``."""
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        a, b = lora["A"], lora["B"]
        xa = x.astype(a.dtype) @ a.T
        delta = (xa.astype(jnp.promote_types(a.dtype, b.dtype)) @ b.T) * lora["scale"]
        y = y + delta.astype(y.dtype)
    return y
