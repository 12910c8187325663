"""The demo's copy rows: repeated random token strings, alone or mixed into corpus rows."""

import numpy as np
import pytest

from hfjax.demo.pretrain import copy_rows, mix_copy_rows


def test_copy_rows_repeat_their_first_half_and_skip_special_ids():
    rows = copy_rows(5, 16, 50, seed=3, first_id=3)
    assert rows.shape == (5, 16) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[:, :8], rows[:, 8:])
    assert rows.min() >= 3 and rows.max() < 50
    np.testing.assert_array_equal(rows, copy_rows(5, 16, 50, seed=3))  # seeded
    assert not np.array_equal(rows, copy_rows(5, 16, 50, seed=4))
    with pytest.raises(ValueError, match="even seq_len"):
        copy_rows(5, 15, 50)


def test_mix_copy_rows_appends_the_asked_share_and_keeps_the_text():
    text = np.arange(30 * 8, dtype=np.int32).reshape(30, 8) % 40
    mixed = mix_copy_rows(text, 0.25, 40, seed=1)
    assert mixed.shape == (40, 8) and mixed.dtype == text.dtype  # 10 / 40 rows copy rows
    np.testing.assert_array_equal(mixed[:30], text)
    np.testing.assert_array_equal(mixed[30:, :4], mixed[30:, 4:])
    assert mix_copy_rows(text, 0.0, 40) is text
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="copy row fraction"):
            mix_copy_rows(text, bad, 40)
