"""Accumulation windows (docs/algorithm.md §7): the original's per-epoch windows and the continuous
ones."""

from __future__ import annotations

import pytest

from hfjax.training.accumulation import (
    WindowModeError,
    describe,
    plan_updates,
    schedule_steps,
    uneven,
    windows,
)


def spans(ws):
    return [[(e, i) for e, i in w.items] for w in ws]


def test_original_windows_of_the_worked_example():
    ws = windows(10, 4, 3, "original")  # docs/algorithm.md §7: 6 updates, T = 7, e2[8..9] dropped
    assert len(ws) == 6 and schedule_steps(10, 4, 3, "original") == 7
    e = lambda ep, a, b: [(ep, i) for i in range(a, b)]  # noqa: E731
    assert spans(ws) == [e(0, 0, 4), e(0, 4, 8), e(0, 8, 10) + e(1, 0, 4), e(1, 4, 8),
                         e(1, 8, 10) + e(2, 0, 4), e(2, 4, 8)]
    assert all(w.scale == 0.25 for w in ws)  # every loss / accum, even in the 6-wide windows
    assert uneven(ws, 4) == [2, 4]
    assert [(w.start, w.stop) for w in ws][2] == (8, 14)  # ranges of the global stream
    for a, b in zip(ws, ws[1:], strict=False):
        assert a.stop == b.start


def test_continuous_windows_of_the_worked_example():
    ws = windows(10, 4, 3, "continuous")
    assert len(ws) == 7 and all(len(w) == 4 and w.scale == 0.25 for w in ws)
    assert spans(ws)[2] == [(0, 8), (0, 9), (1, 0), (1, 1)]
    assert ws[-1].stop == 28  # e2[8..9] dropped
    assert uneven(ws, 4) == []


def test_no_update_when_an_epoch_is_shorter_than_accum():
    assert windows(3, 4, 1, "original") == [] and schedule_steps(3, 4, 1, "original") == 0
    # T = 9 // 4 = 2 but the per-epoch counter never reaches accum: no update at all
    assert windows(3, 4, 3, "original") == [] and schedule_steps(3, 4, 3, "original") == 2
    (w,) = windows(3, 4, 1, "continuous")  # continuous always makes one update
    assert len(w) == 3 and w.scale == pytest.approx(1 / 3)


@pytest.mark.parametrize("n,accum,epochs", [(8, 4, 3), (9, 1, 2), (1800, 8, 3)])
def test_modes_agree_when_accum_divides(n, accum, epochs):
    a, b = windows(n, accum, epochs, "original"), windows(n, accum, epochs, "continuous")
    assert spans(a) == spans(b) and [w.scale for w in a] == [w.scale for w in b]
    assert len(a) == epochs * (n // accum) == schedule_steps(n, accum, epochs, "original")


def test_update_count_is_epochs_times_windows_per_epoch():
    for n in range(1, 12):
        for accum in range(1, 6):
            ws = windows(n, accum, 3, "original")
            assert len(ws) == 3 * (n // accum)
            assert all(accum <= len(w) < 2 * accum for w in ws)


def test_max_steps_caps_windows_and_schedule():
    ws, t = plan_updates(10, 4, 3, "original", max_steps=3)
    assert len(ws) == 3 and t == 3
    ws, t = plan_updates(10, 4, 3, "original")
    assert len(ws) == 6 and t == 7


def test_describe_names_uneven_windows():
    text = describe(windows(10, 4, 3, "original"), 4, 10, 3, "original")
    assert "updates: 6" in text and "T = 7" in text and "#2 (6 micro-batches)" in text
    assert "no uneven windows" in describe(windows(8, 4, 1, "original"), 4, 8, 1, "original")


def test_bad_modes_are_refused():
    with pytest.raises(WindowModeError, match="train.windows"):
        windows(10, 4, 3, "epoch")
    with pytest.raises(WindowModeError, match="grad_accum"):
        windows(10, 0, 3, "original")
