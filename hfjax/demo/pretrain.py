"""Full-parameter pretraining of the demo's tiny base models, in JAX.

A randomly initialised base model makes a poor LoRA host: every expert would have to learn
the language from scratch through rank-r updates. So each family's base is first trained on
:func:`hfjax.testing.tasks.pretraining_corpus` text with plain next-token prediction (the
default demo: 2500 steps, half the packed rows repeated random strings, :func:`mix_copy_rows`,
so that a copy circuit forms; about 3-5 minutes per family on 2 cores, which is why those
bases are built once and shipped, `hfjax.demo.shipped`)::

    docs    = pretraining_corpus(4000, seed=0)                   # list[str]
    tokens  = pack_corpus(docs, tokenizer, seq_len=128)           # int32 (n_rows, 128)
    params, losses = pretrain(model_cfg, init_params(...), tokens, PretrainConfig(steps=300))
    build_base_model(out_dir, shape, tokenizer, params=params)    # an HF checkpoint

Packing: each document is encoded without special tokens and followed by the tokenizer's
eos id; the documents are concatenated and cut into fixed-length rows (the tail is dropped),
so every step has the same shape and the step function compiles once. Batches are drawn
from a per-epoch permutation of the rows (``numpy`` PCG64 seeded by ``(seed, epoch)``).

The steps run through the shared loop (`hfjax.training.loop`: one step in flight, a
non-finite loss stops the run) with no output directory. The optimiser is optax AdamW with a
warmup-stable-decay schedule, all parameters trained, float32, loss = mean token
cross-entropy over every position (`hfjax.training.objective.token_nll`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hfjax.models.config import ModelConfig
from hfjax.models.decoder import forward
from hfjax.training.loop import LoopSettings, run_loop
from hfjax.training.objective import IGNORE_INDEX, token_nll

__all__ = ["PretrainConfig", "copy_nll", "copy_rows", "mix_copy_rows", "pack_corpus", "pretrain"]


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """How long and how hard to pretrain one base model.

    Attributes:
        steps: Optimizer steps (one batch each).
        batch_size: Packed rows per step.
        seq_len: Tokens per packed row.
        lr: Peak AdamW learning rate.
        warmup_ratio: Share of ``steps`` spent warming up linearly from 0.
        decay_ratio: Share of ``steps`` at the end spent decaying linearly to 0; the lr is
            constant in between (warmup-stable-decay: a short run spends most of its
            steps at the peak lr).
        weight_decay: AdamW decoupled weight decay.
        seed: Seeds the batch order.
    """

    steps: int = 300
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 5e-3
    warmup_ratio: float = 0.1
    decay_ratio: float = 0.2
    weight_decay: float = 0.01
    seed: int = 0


def wsd_schedule(lr: float, steps: int, warmup_ratio: float, decay_ratio: float
                 ) -> optax.Schedule:
    """Linear warmup from 0, constant ``lr``, linear decay to 0 over the last steps."""
    warmup = max(1, int(warmup_ratio * steps))
    decay = max(1, int(decay_ratio * steps))
    stable = max(0, steps - warmup - decay)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr),
         optax.linear_schedule(lr, 0.0, decay)], [warmup, warmup + stable])


def pack_corpus(texts: Iterable[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """Encode ``texts`` (each followed by eos), concatenate, cut into ``(n, seq_len)`` rows.

    Raises:
        ValueError: if the corpus is shorter than one row.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            stream.append(int(eos))
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one row of {seq_len}")
    return np.asarray(stream[: n_rows * seq_len], np.int32).reshape(n_rows, seq_len)


def copy_rows(n_rows: int, seq_len: int, vocab_size: int, *, seed: int = 0,
              first_id: int = 3) -> np.ndarray:
    """``(n_rows, seq_len)`` int32 rows, each a random token string followed by itself.

    Only copying predicts the second half, so training on these forms a copy circuit that
    plain text does not teach a tiny model in the demo's time; it is born after a plateau
    of 500-2000 steps whose length varies from run to run (docs/demo.md). Ids below
    ``first_id`` (the special tokens) are not used; ``seq_len`` must be even.
    """
    if seq_len % 2 or n_rows < 1 or vocab_size <= first_id:
        raise ValueError(f"copy_rows: need n_rows >= 1, an even seq_len and vocab_size > "
                         f"{first_id}; got {n_rows}, {seq_len}, {vocab_size}")
    half = np.random.default_rng(seed).integers(first_id, vocab_size, (n_rows, seq_len // 2))
    return np.concatenate([half, half], axis=1).astype(np.int32)


def mix_copy_rows(tokens: np.ndarray, fraction: float, vocab_size: int, *,
                  seed: int = 0) -> np.ndarray:
    """``tokens`` plus :func:`copy_rows` so that ``fraction`` of the rows are copy rows.

    The rows are appended (``pretrain`` draws batches from a permutation, so they are
    interleaved with the corpus); ``fraction=0`` returns ``tokens`` unchanged. Unlike a
    warm-up phase before the corpus, mixed rows keep rewarding copying while the language is
    learned, so the circuit is not unlearned afterwards.

    Raises:
        ValueError: unless ``0 <= fraction < 1``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"copy row fraction must be in [0, 1), got {fraction}")
    n = round(tokens.shape[0] * fraction / (1.0 - fraction))
    if n == 0:
        return tokens
    rows = copy_rows(n, tokens.shape[1], vocab_size, seed=seed)
    return np.concatenate([tokens, rows.astype(tokens.dtype)])


def copy_nll(cfg: ModelConfig, params: Any, *, n_rows: int = 16, seq_len: int = 128,
             seed: int = 12345) -> tuple[float, float]:
    """Mean NLL of the first and the second half of fresh :func:`copy_rows`.

    A model that copies predicts the second half (near 0) but not the first (about
    ``log(vocab)``): the test of whether pretraining formed a copy circuit.
    """
    rows = jnp.asarray(copy_rows(n_rows, seq_len, cfg.vocab_size, seed=seed))
    logits, _ = forward(params, cfg, rows, jnp.ones_like(rows), {})
    pos = jnp.arange(seq_len)
    half = seq_len // 2
    # the second half's first token is not copyable (nothing before it says a copy starts)
    out = []
    for keep in (pos < half, pos > half):
        total, count = token_nll(logits, jnp.where(keep, rows, IGNORE_INDEX))
        out.append(float(total / count))
    return out[0], out[1]


def _loss(params: Any, cfg: ModelConfig, ids: jax.Array) -> jax.Array:
    logits, _ = forward(params, cfg, ids, jnp.ones_like(ids), {})
    total, count = token_nll(logits, ids)
    return total / jnp.maximum(count, 1)


@partial(jax.jit, static_argnames=("cfg", "optimizer"), donate_argnums=(0, 1))
def _step(params: Any, opt_state: Any, ids: jax.Array, *, cfg: ModelConfig,
          optimizer: optax.GradientTransformation) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(_loss)(params, cfg, ids)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batches(n_rows: int, batch_size: int, seed: int) -> Any:
    """Row indices of successive batches: epoch permutations, batches never straddle epochs."""
    epoch = 0
    while True:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
        order = rng.permutation(n_rows)
        for b in range(n_rows // batch_size):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch += 1


def pretrain(cfg: ModelConfig, params: Any, tokens: np.ndarray, pcfg: PretrainConfig, *,
             progress: bool = True, desc: str = "pretrain") -> tuple[Any, list[float]]:
    """Train every parameter of ``params`` on packed ``tokens`` for ``pcfg.steps`` steps.

    Args:
        cfg: The model's config.
        params: Initial float32 parameters (e.g. `hfjax.loading.init_params`); donated.
        tokens: ``(n_rows, seq_len)`` int32 from :func:`pack_corpus`; ``seq_len`` must be
            ``pcfg.seq_len`` and ``n_rows >= pcfg.batch_size``.
        pcfg: Steps, batch, learning rate, seed.
        progress: Show a tqdm bar (on stderr) with the running loss.
        desc: The bar's label.

    Returns:
        The trained parameters and the loss of every step.

    Raises:
        RunDiverged: a non-finite loss, or non-finite parameters at the end.
    """
    if tokens.ndim != 2 or tokens.shape[1] != pcfg.seq_len:
        raise ValueError(f"tokens must be (n, {pcfg.seq_len}), got {tokens.shape}")
    if tokens.shape[0] < pcfg.batch_size:
        raise ValueError(f"{tokens.shape[0]} packed rows < batch size {pcfg.batch_size}")
    optimizer = optax.adamw(wsd_schedule(pcfg.lr, pcfg.steps, pcfg.warmup_ratio,
                                         pcfg.decay_ratio), weight_decay=pcfg.weight_decay)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

    def step_fn(state: tuple[Any, Any], ids: jax.Array) -> tuple[tuple[Any, Any], dict]:
        new_params, opt_state, loss = _step(*state, ids, cfg=cfg, optimizer=optimizer)
        return (new_params, opt_state), {"loss": loss}

    def batches(start: int) -> Iterator[jax.Array]:
        return (jnp.asarray(tokens[rows])
                for rows in _batches(tokens.shape[0], pcfg.batch_size, pcfg.seed))

    res = run_loop(step_fn, (params, optimizer.init(params)), batches,
                   LoopSettings(total_steps=pcfg.steps, desc=desc), None,
                   trained=lambda state: state[0], progress=progress)
    return res.state[0], res.losses
