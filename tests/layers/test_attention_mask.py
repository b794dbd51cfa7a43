import numpy as np
from keras import ops

from keras_paligemma.layers.attention_mask import prefix_lm_attention_mask


def mask(valid, response, positions=None, **kwargs):
    valid = np.array([valid], bool)
    response = np.array([response], bool)
    if positions is None:
        positions = np.arange(valid.shape[1])[None]
    out = prefix_lm_attention_mask(valid, response, positions, **kwargs)
    return ops.convert_to_numpy(out).astype(int)[0]


def test_prefix_is_bidirectional_answer_is_causal_padding_hidden():
    got = mask([1, 1, 1, 1, 1, 0], [0, 0, 0, 1, 1, 0])
    expected = [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ]
    np.testing.assert_array_equal(got, expected)


def test_query_slice_matches_rows_of_the_full_mask():
    valid, response = [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]
    full = mask(valid, response, sliding_window=2)
    for start in range(6):
        row = mask(
            valid, response, query_start=start, query_length=1,
            sliding_window=2,
        )
        np.testing.assert_array_equal(row[0], full[start])


def test_sliding_window_limits_answers_but_keeps_long_prefix_visible():
    # A prefix of 4 tokens is longer than the window of 2: it stays fully
    # mutually visible (transformers' rule); answers see 2 keys back.
    got = mask([1] * 6, [0, 0, 0, 0, 1, 1], sliding_window=2)
    expected = [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    np.testing.assert_array_equal(got, expected)


def test_window_counts_positions_not_columns():
    # Padding between prefix and answer does not count towards the window.
    valid = [1, 1, 0, 0, 1]
    positions = [[0, 1, 2, 2, 2]]
    got = mask(valid, [0, 0, 0, 0, 1], positions, sliding_window=2)
    np.testing.assert_array_equal(got[4], [0, 1, 0, 0, 1])
