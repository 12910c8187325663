"""Accumulation windows: which micro-batches each optimizer update sums, and their scale.

``windows(n_batches, accum, epochs, mode)`` lists the updates of a run; each `Window` is the
micro-batches ``(epoch, batch index)`` it sums and the factor each micro-batch loss is
multiplied by. Both modes take micro-batches in stream order (epoch by epoch), so a window is
also a range ``[start, stop)`` of global indices ``epoch · n_batches + index``.

``"original"`` (the first release, docs/algorithm.md §7): the counter restarts every epoch, the
optimizer steps when ``(i + 1) % accum == 0``, gradients are not zeroed at an epoch boundary (the
leftover rolls into the next epoch's first update), each loss is divided by ``accum``, the
last leftover is dropped. ``"continuous"``: ``T = max(1, n_batches·epochs // accum)``
consecutive windows of ``accum`` of the concatenated stream, each loss divided by the number
of micro-batches in its window. Example, ``n_batches = 10, accum = 4, epochs = 3``::

    original:   e0[0..3] e0[4..7] e0[8..9]+e1[0..3] e1[4..7] e1[8..9]+e2[0..3] e2[4..7]
                6 updates, scale 1/4 each (the 6-micro-batch windows sum to 1.5)
    continuous: e0[0..3] e0[4..7] e0[8..9]+e1[0..1] ... 7 updates of 4, scale 1/4
"""

from __future__ import annotations

import dataclasses

from hfjax.errors import UserError

WINDOW_MODES = ("original", "continuous")


class WindowModeError(UserError):
    """``train.windows`` is not a known mode, or the sizes are not positive."""


@dataclasses.dataclass(frozen=True)
class Window:
    """One optimizer update: micro-batches ``(epoch, index)`` in order, each loss times
    ``scale``."""

    items: tuple[tuple[int, int], ...]
    scale: float
    n_batches: int  # micro-batches per epoch (to turn items into global indices)

    @property
    def start(self) -> int:
        e, i = self.items[0]
        return e * self.n_batches + i

    @property
    def stop(self) -> int:
        e, i = self.items[-1]
        return e * self.n_batches + i + 1

    def __len__(self) -> int:
        return len(self.items)


def windows(n_batches: int, accum: int, epochs: int, mode: str = "original") -> list[Window]:
    """All of a run's optimizer updates (before any ``max_steps`` cap)."""
    if mode not in WINDOW_MODES:
        raise WindowModeError(f"config: train.windows must be one of {WINDOW_MODES}, "
                              f"got {mode!r}")
    if n_batches < 1 or accum < 1 or epochs < 1:
        raise WindowModeError(f"config: batches per epoch ({n_batches}), train.grad_accum "
                              f"({accum}) and train.epochs ({epochs}) must be >= 1")
    stream = [(e, i) for e in range(epochs) for i in range(n_batches)]
    if mode == "continuous":
        t = max(1, len(stream) // accum)
        out = []
        for s in range(t):
            items = tuple(stream[s * accum:(s + 1) * accum])
            out.append(Window(items, 1.0 / len(items), n_batches))
        return out
    out, pending = [], []
    for e, i in stream:
        pending.append((e, i))
        if (i + 1) % accum == 0:
            out.append(Window(tuple(pending), 1.0 / accum, n_batches))
            pending = []
    return out  # the last leftover (pending) never reaches an update


def schedule_steps(n_batches: int, accum: int, epochs: int, mode: str) -> int:
    """The length ``T`` the lr schedule is sized for: ``(n_batches·epochs) // accum`` (at
    least 1 in ``"continuous"`` mode, which always updates)."""
    t = (n_batches * epochs) // accum
    return max(1, t) if mode == "continuous" else t


def uneven(ws: list[Window], accum: int) -> list[int]:
    """Indices of the windows that do not hold exactly ``accum`` micro-batches."""
    return [s for s, w in enumerate(ws) if len(w) != accum]


def describe(ws: list[Window], accum: int, n_batches: int, epochs: int, mode: str) -> str:
    """One line for --dry_run: updates, schedule length, the uneven windows."""
    odd = uneven(ws, accum)
    used = sum(len(w) for w in ws)
    text = (f"updates: {len(ws)} ({mode} windows; schedule T = "
            f"{schedule_steps(n_batches, accum, epochs, mode)}; {used} of "
            f"{n_batches * epochs} micro-batches used)")
    if odd:
        shown = ", ".join(f"#{s} ({len(ws[s])} micro-batches)" for s in odd[:6])
        more = f", ... {len(odd) - 6} more" if len(odd) > 6 else ""
        text += f"; uneven windows: {shown}{more}"
    else:
        text += "; no uneven windows"
    return text


def plan_updates(n_batches: int, accum: int, epochs: int, mode: str, max_steps: int = -1
                 ) -> tuple[list[Window], int]:
    """(the windows of the run, the schedule length); ``max_steps > 0`` caps both."""
    ws = windows(n_batches, accum, epochs, mode)
    t = schedule_steps(n_batches, accum, epochs, mode)
    if max_steps and max_steps > 0:
        ws, t = ws[:max_steps], min(t, max_steps)
    return ws, t
