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
    """A (possibly LoRA-patched) linear layer on the last axis of ``x``. A uint16 kernel is a
    frozen bf16 kernel's bits (`as_bits`)."""
    if p["kernel"].dtype == jnp.uint16:
        # Rematerialised: the backward re-reads the bits, not a saved bf16 (or f32) copy.
        y = jax.checkpoint(_bits_dot)(x, p["kernel"])
    else:
        y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    if lora is not None:
        a, b = lora["A"], lora["B"]
        xa = x.astype(a.dtype) @ a.T
        delta = lora_up(xa.astype(jnp.promote_types(a.dtype, b.dtype)), b, lora["scale"])
        y = y + delta.astype(y.dtype)
    return y


@jax.custom_jvp
def as_bits(w: jax.Array) -> jax.Array:
    """A frozen bf16 kernel as its uint16 bits (a free bitcast; `linear` reads them back).

    The scanned decoder on CPU hands its kernels to the layers this way (see
    ``hfjax.models.decoder._kernels_as_bits``). Not differentiable: the base is frozen, and
    a gradient with respect to it raises instead of coming back as zeros."""
    return jax.lax.bitcast_convert_type(w, jnp.uint16)


@as_bits.defjvp
def _as_bits_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> Any:
    raise TypeError("hfjax: the scanned decoder on CPU reads bf16 base kernels as frozen bits; "
                    "differentiate the LoRA factors, or use a float32 base to train the "
                    "base weights")


def _bits_dot(x: jax.Array, bits: jax.Array) -> jax.Array:
    return x @ jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(x.dtype)


@jax.custom_vjp
def lora_up(xa: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``(xa @ Bᵀ) · scale`` with a hand-written backward for ``B``.

    ``∂B = scale · (Σ_tokens dy ⊗ xa)`` is computed as ``(xaᵀ dy)ᵀ``: the token axis is
    contracted with the small ``(tokens, r)`` operand transposed, never the big
    ``(tokens, d_out)`` cotangent. Left to autodiff, XLA:CPU materialises ``dyᵀ`` with a
    strided copy per patched module; this form avoids it and gives the same values
    (measured: docs/performance.md §4.4).
    """
    return (xa @ b.T) * scale


def _lora_up_fwd(xa: jax.Array, b: jax.Array, scale: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    return lora_up(xa, b, scale), (xa, b, scale)


def _lora_up_bwd(res: tuple[jax.Array, jax.Array, jax.Array], dy: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    xa, b, scale = res
    dy = dy.astype(xa.dtype)
    lead = tuple(range(xa.ndim - 1))  # every token axis
    g_bt = jax.lax.dot_general(xa, dy, ((lead, lead), ((), ())))  # (r, d_out)
    g_b = (g_bt * scale).T.astype(b.dtype)
    g_xa = (dy @ b) * scale
    g_scale = jnp.sum(dy * (xa @ b.T)).astype(jnp.result_type(scale))
    return g_xa.astype(xa.dtype), g_b, jnp.reshape(g_scale, jnp.shape(scale))


lora_up.defvjp(_lora_up_fwd, _lora_up_bwd)
