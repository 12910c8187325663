"""AdamW with HF's cosine-with-warmup schedule, built from optax pieces.

``get_cosine_schedule_with_warmup(num_warmup_steps=int(0.05 * T), num_training_steps=T)``
gives ``lr · step / warmup`` during warmup (so the first update runs at lr 0) and
``lr · ½(1 + cos(π · progress))`` after; `optax.warmup_cosine_decay_schedule` with
``init_value=0`` and ``end_value=0`` is the same function. AdamW matches torch's
(decoupled weight decay, ``eps`` outside the square root); no gradient clipping.
"""

from __future__ import annotations

import optax


def total_steps(n_batches: int, epochs: int, grad_accum: int, max_steps: int = -1) -> int:
    """``T = (n_batches · epochs) // accum`` as the original; ``max_steps > 0`` caps it."""
    t = max(1, (n_batches * epochs) // grad_accum)
    return min(t, max_steps) if max_steps and max_steps > 0 else t


def cosine_with_warmup(lr: float, steps: int, warmup_ratio: float) -> optax.Schedule:
    warmup = int(warmup_ratio * steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1),
        end_value=0.0)


def adamw(lr: float, steps: int, *, warmup_ratio: float = 0.05, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
          ) -> optax.GradientTransformation:
    return optax.adamw(cosine_with_warmup(lr, steps, warmup_ratio), b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay)
