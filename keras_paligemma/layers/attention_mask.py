"""The one attention-mask function of PaliGemma: a prefix-LM mask.

PaliGemma reads `[image tokens][<bos> prompt \\n][answer <eos>]`. The image
and the prompt form the *prefix*, which attends to itself bidirectionally;
the answer is causal: each answer token sees the whole prefix and the answer
tokens before it. Padding is never attended.

Every place that needs a mask (training forward pass, prefill, each cached
decode step, sliding-window layers) calls `prefix_lm_attention_mask`, so the
rule lives here only. The one exception is the ring cache of a
sliding-window layer while decoding (`window_cache.py`), whose slots are not
in sequence order: `window_ring_mask` states what the rule reduces to there.
"""

from keras import ops


def prefix_lm_attention_mask(
    valid,
    response,
    positions,
    query_start=0,
    query_length=None,
    sliding_window=None,
):
    """Build the boolean attention mask of a prefix-LM.

    The mask follows big_vision's rule: with `stage = cumsum(response)`, a
    query may attend to a valid key whose stage is not larger than its own.
    Prefix tokens have stage 0, so they see each other in both directions;
    the n-th answer token has stage n, so it sees the prefix and answer
    tokens up to itself.

    With `sliding_window=w`, a query in the answer additionally sees only
    keys with `query_position - key_position < w`; the prefix stays mutually
    visible whatever its length (the same rule as HF transformers' Gemma 2).

    Args:
        valid: bool tensor `(batch, keys)`, False for padding and for cache
            slots that do not hold a token.
        response: bool or int tensor `(batch, keys)`, True for answer tokens
            (causal), False for image and prompt tokens (prefix).
        positions: int tensor `(batch, keys)`, each token's position in its
            own sequence (padding excluded); only read with a window.
        query_start: index of the first query among the keys (an int or a
            scalar tensor, e.g. the cache index while decoding).
        query_length: number of queries; `None` (the default) means every
            key is also a query and `query_start` is ignored.
        sliding_window: `None` for full attention, else the window size.

    Returns:
        bool tensor `(batch, query_length, keys)`.

    Example:

    >>> valid = ops.convert_to_tensor([[True, True, True, False]])
    >>> response = ops.convert_to_tensor([[False, False, True, False]])
    >>> positions = ops.convert_to_tensor([[0, 1, 2, 3]])
    >>> mask = prefix_lm_attention_mask(valid, response, positions)
    >>> ops.convert_to_numpy(mask).astype(int)[0].tolist()
    [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    """
    valid = ops.cast(valid, "bool")
    stage = ops.cumsum(ops.cast(response, "int32"), axis=-1)
    batch_size = ops.shape(stage)[0]

    def queries(per_key):
        if query_length is None:
            return per_key
        return ops.slice(per_key, [0, query_start], [batch_size, query_length])

    query_stage = queries(stage)
    allowed = ops.logical_and(
        valid[:, None, :],
        ops.less_equal(stage[:, None, :], query_stage[:, :, None]),
    )
    if sliding_window is None:
        return allowed
    positions = ops.cast(positions, "int32")
    distance = queries(positions)[:, :, None] - positions[:, None, :]
    in_window = ops.less(distance, sliding_window)
    # `ops.equal`, not `==`: symbolic Keras tensors do not overload `==`.
    query_in_prefix = ops.equal(query_stage[:, :, None], 0)
    return ops.logical_and(allowed, ops.logical_or(in_window, query_in_prefix))


def window_ring_mask(query_positions, window):
    """The prefix-LM mask of one decoded token over a window ring cache.

    A decoded token is an answer token at position `p`; under
    `prefix_lm_attention_mask` with `sliding_window=window` it sees every
    valid key at positions `p - window + 1 .. p`: those keys are earlier
    tokens, so none is at a later stage. The ring holds exactly those
    positions (slot `j` holds the latest position `<= p` with `q % window
    == j`), so the mask only hides the slots of negative positions, which
    exist while the sequence is shorter than the window.

    Args:
        query_positions: int `(batch,)`, the decoded token's position.
        window: the sliding window, which is also the ring's slot count.

    Returns:
        bool tensor `(batch, 1, window)`.

    Example:

    >>> mask = window_ring_mask(ops.convert_to_tensor([1, 5]), window=4)
    >>> ops.convert_to_numpy(mask).astype(int)[:, 0].tolist()
    [[1, 1, 0, 0], [1, 1, 1, 1]]
    """
    query_positions = ops.cast(query_positions, "int32")[:, None]
    slots = ops.arange(window, dtype="int32")[None, :]
    held = query_positions - ops.mod(query_positions - slots, window)
    return ops.greater_equal(held, 0)[:, None, :]
