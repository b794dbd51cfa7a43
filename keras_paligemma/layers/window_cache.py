"""The KV cache of a sliding-window layer: a ring of the last positions.

With `sliding_window=w`, an answer token at position `p` attends only to
the keys at positions `p - w + 1 .. p` (see `prefix_lm_attention_mask`).
While decoding, such a layer therefore needs `w` cache slots, not one per
column of image + prompt + answer: position `q` lives in slot `q % w`, and
each new token overwrites the position that just left its window. The
prefix (image + prompt) still attends to itself in full during the
prefill, which runs on the full cache; `window_rings` then keeps the window
of it that decoding needs.

Rows of a batch keep their own positions (padding does not count), so the
slot written at a decode step is per row.
"""

import keras
from keras import ops

from keras_paligemma.layers.attention_mask import window_ring_mask


def window_rings(cache, sliding_window, positions, last_position):
    """The per-layer caches with the sliding-window layers' made rings.

    Sliding-window layers are layers 0, 2, 4, ...; their caches become
    rings (`ring_from_cache`) only when the window is shorter than the
    cache, which must have a static length. Other caches are returned as
    they are.

    Args:
        cache: a tuple of per-layer `(batch, 2, columns, kv_heads,
            head_dim)` caches, prefilled.
        sliding_window: `None` or the window.
        positions, last_position: see `ring_columns`.
    """
    columns = cache[0].shape[2]
    if sliding_window is None or not isinstance(columns, int):
        return cache
    if sliding_window >= columns:
        return cache
    # Which column each slot takes, for every row: the same in all layers.
    taken = ring_columns(positions, last_position, sliding_window)
    return tuple(
        ring_from_cache(c, taken) if i % 2 == 0 else c
        for i, c in enumerate(cache)
    )


def holds_window_rings(cache, sliding_window, keys):
    """Whether `cache` holds rings: its first layer's is shorter than `keys`.

    A cache made by `window_rings` holds rings exactly when its first
    (sliding-window) layer has fewer slots than the sequence has keys.
    """
    if cache is None or sliding_window is None:
        return False
    slots = cache[0].shape[2]
    return isinstance(slots, int) and isinstance(keys, int) and slots < keys


def ring_mask_and_slots(query_positions, window):
    """A decode step's mask over a ring and the slot each row writes.

    Args:
        query_positions: int `(batch, 1)`, the decoded token's position.
        window: the sliding window.

    Returns:
        `(mask, slots)`: see `window_ring_mask`; slots are `(batch,)`.
    """
    if query_positions.shape[1] != 1:
        raise ValueError(
            "A cache with sliding-window rings takes one query per call (a "
            f"decode step); got {query_positions.shape[1]}."
        )
    query_positions = query_positions[:, 0]
    slots = ops.mod(ops.cast(query_positions, "int32"), window)
    return window_ring_mask(query_positions, window), slots


def ring_columns(positions, last_position, window):
    """For each ring slot, the column of the position it holds.

    Slot `j` holds position `q` with `q % window == j` and `last_position
    - window < q <= last_position`. While the prefix is shorter than the
    window, the slots of negative positions take the column of position 0,
    a stand-in that `window_ring_mask` hides.

    Args:
        positions: int `(batch, columns)`, each column's position: the
            count of valid columns before it (`sequence_layout`).
        last_position: int `(batch,)`, each row's last prefilled position.
        window: the sliding window.

    Returns:
        int `(batch, window)` column indices.

    Example:

    >>> positions = ops.convert_to_tensor([[0, 1, 1, 2, 3]])  # column 2 pads
    >>> columns = ring_columns(positions, ops.array([3]), window=2)
    >>> ops.convert_to_numpy(columns).tolist()  # positions 2 and 3
    [[3, 4]]
    """
    positions = ops.cast(positions, "int32")
    columns = ops.shape(positions)[1]
    last_position = ops.cast(last_position, "int32")[:, None]
    slots = ops.arange(window, dtype="int32")[None, :]
    # The position each slot holds: the latest one `<= last` in its class
    # (negative ones are hidden; any column will do for them).
    held = last_position - ops.mod(last_position - slots, window)
    held = ops.maximum(held, 0)
    # Positions never decrease along a row, so the column of `held` is the
    # count of columns at lower positions: a sorted search. One flat search
    # serves all rows, each row's values lifted above the rows before it.
    rows = ops.arange(ops.shape(positions)[0], dtype="int32")[:, None]
    lift = rows * (columns + 1)
    found = ops.searchsorted(
        ops.reshape(positions + lift, (-1,)),
        ops.reshape(held + lift, (-1,)),
        side="left",
    )
    found = ops.reshape(ops.cast(found, "int32"), (-1, window))
    return found - rows * columns


def ring_from_cache(cache, columns):
    """The ring of a prefilled cache: slot `j` of row `b` takes the
    keys and values of column `columns[b, j]` (see `ring_columns`).

    Args:
        cache: `(batch, 2, cache_columns, kv_heads, head_dim)` keys and
            values, one slot per column.
        columns: int `(batch, window)`.

    Returns:
        `(batch, 2, window, kv_heads, head_dim)`.
    """
    batch, window = ops.shape(columns)[0], ops.shape(columns)[1]
    cache_columns = ops.shape(cache)[2]
    rows = ops.arange(batch, dtype="int32")[:, None] * cache_columns
    flat = ops.reshape(
        ops.transpose(cache, (0, 2, 1, 3, 4)),
        (-1,) + tuple(cache.shape[1:2]) + tuple(cache.shape[3:]),
    )
    ring = ops.take(flat, ops.reshape(rows + columns, (-1,)), axis=0)
    ring = ops.reshape(ring, (batch, window) + tuple(ring.shape[1:]))
    return ops.transpose(ring, (0, 2, 1, 3, 4))


def write_into_ring(ring, keys_values, slots):
    """`ring` with one token's `keys_values` written at each row's slot.

    `keys_values` is `(batch, 2, 1, kv_heads, head_dim)`, `slots` int
    `(batch,)`. On PyTorch outside autograd (generation) the slots are
    written in place, as `write_into_cache` does; elsewhere a select
    rewrites the ring (`window` slots per layer and step).
    """
    if keras.config.backend() == "torch":
        import torch

        if not torch.is_grad_enabled():
            rows = torch.arange(ring.shape[0], device=ring.device)
            ring[rows, :, slots.long()] = keys_values[:, :, 0]
            return ring
    one_hot = ops.equal(
        ops.arange(ring.shape[2], dtype="int32")[None, :],
        ops.cast(slots, "int32")[:, None],
    )
    return ops.where(one_hot[:, None, :, None, None], keys_values, ring)
