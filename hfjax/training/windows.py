"""Optimizer-step windows: ``accum`` padded micro-batches stacked to ``(accum, B, L)``.

The fuse and train-lora loops feed their jitted steps the same way::

    stream  = micro_batch_stream(replay, batch_size=2, epochs=3, seed=0, buckets=(64, 128),
                                 pad_id=pad_id_of(tokenizer), start=step * accum)
    for w in windows(stream, accum=4, batch_size=2, pad_id=...):
        w.batch["input_ids"]   # int32 (4, 2, L): L = the window's longest micro-batch
        w.weights              # float32 (4,): 1 per real micro-batch, 0 per filler
        w.tokens               # attended tokens in the window (for tokens/s)

The stream is the concatenation of the epochs' shuffled orders; optimizer step ``s``
consumes micro-batches ``[s·accum, (s+1)·accum)``, so a resumed run re-enters the stream
exactly where its checkpoint left it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from hfjax.training.data import ReplaySet, iterate_batches, num_batches

__all__ = ["Window", "micro_batch_stream", "pad_id_of", "stack_window", "windows"]


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id; its eos id (or 0) when it has none."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id or 0
    return int(pad_id)


def micro_batch_stream(replay: ReplaySet, *, batch_size: int, epochs: int, seed: int,
                       buckets: Sequence[int], pad_id: int, start: int = 0
                       ) -> Iterator[dict[str, np.ndarray]]:
    """All epochs' micro-batches in order, from global micro-batch index ``start``."""
    per_epoch = num_batches(len(replay.examples), batch_size)
    epoch, first = divmod(start, per_epoch)
    for e in range(epoch, epochs):
        yield from iterate_batches(replay.examples, batch_size=batch_size, epoch=e, seed=seed,
                                   buckets=buckets, pad_id=pad_id, start=first)
        first = 0


def stack_window(window: list[dict[str, np.ndarray]], accum: int, batch_size: int,
                 pad_id: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pad a window's micro-batches to one length and batch size, stack to (accum, B, L).

    Filler micro-batches (when the window is short) get weight 0 and no supervised tokens.
    """
    length = max(b["input_ids"].shape[1] for b in window)
    out = {"input_ids": np.full((accum, batch_size, length), pad_id, np.int32),
           "attention_mask": np.zeros((accum, batch_size, length), np.int32),
           "labels": np.full((accum, batch_size, length), -100, np.int32)}
    for i, b in enumerate(window):
        n, t = b["input_ids"].shape
        for k in out:
            out[k][i, :n, :t] = b[k]
    weights = np.zeros(accum, np.float32)
    weights[: len(window)] = 1.0
    return out, weights


@dataclasses.dataclass(frozen=True)
class Window:
    """One optimizer step's input."""

    batch: dict[str, np.ndarray]  # input_ids / attention_mask / labels, (accum, B, L)
    weights: np.ndarray  # (accum,) float32: 1 for a real micro-batch, 0 for filler
    tokens: int  # attended tokens in the real micro-batches


def windows(stream: Iterable[dict[str, np.ndarray]], *, accum: int, batch_size: int,
            pad_id: int) -> Iterator[Window]:
    """Group ``stream`` into windows of ``accum`` micro-batches (the last may be short)."""
    it = iter(stream)
    while True:
        window = [b for _, b in zip(range(accum), it, strict=False)]
        if not window:
            return
        batch, weights = stack_window(window, accum, batch_size, pad_id)
        tokens = int(sum(int(b["attention_mask"].sum()) for b in window))
        yield Window(batch, weights, tokens)
