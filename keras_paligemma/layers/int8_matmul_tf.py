"""The tied vocabulary projection of an int8 model on TensorFlow, exact,
without copying the table.

Keras projects hidden states onto an int8 tied embedding table as
`matmul(inputs, transpose(table))` with an int32 result. On TensorFlow's
CPU kernels that transposes the 257,152-row table (0.6 GB) and casts
both operands to int32 (2.4 GB) on every decode step; with oneDNN on
(TensorFlow's default) the memory stays with the process. Generating
with the int8 PaliGemma 2 3B peaked at 0.48x its float32 peak.

`int8_table_matmul` walks the table in chunks of its rows inside a
`tf.while_loop` (one chunk in flight: `parallel_iterations=1`), converts
each chunk to float32 and multiplies it in pieces of at most
`EXACT_DEPTH` columns: int8 values are exact in float32, and each piece
sums at most 1024 products (`127**2 * 1024 < 2**24`), so the float32
sums are exact; the pieces are summed in int32. The result equals
Keras' int32 product bit for bit.
"""

EXACT_DEPTH = 1024
"""Most int8 x int8 products one float32 sum holds exactly."""

CHUNK_ELEMENTS = 2**24
"""Table elements converted at a time (64 MiB as float32)."""


def int8_table_matmul(x, table, chunk_elements=CHUNK_ELEMENTS):
    """int32 `x @ table.T` of int8 operands, on TensorFlow.

    Args:
        x: int8 `(..., K)`.
        table: int8 `(N, K)`, a tied embedding table.
        chunk_elements: table elements converted at a time.

    Returns:
        int32 `(..., N)`, equal to
        `tf.matmul(x, tf.transpose(table), output_type=tf.int32)`.

    Example:

    >>> import numpy as np
    >>> x = np.full((1, 3000), -127, "int8")
    >>> table = np.full((5, 3000), 127, "int8")
    >>> int(int8_table_matmul(x, table)[0, 0]) == -(127**2) * 3000
    True
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    table = tf.convert_to_tensor(table)
    if x.dtype != tf.int8 or table.dtype != tf.int8:
        raise TypeError(
            "`int8_table_matmul` multiplies int8 operands; got `x` of dtype "
            f"{x.dtype.name} and `table` of dtype {table.dtype.name}."
        )
    columns, depth = table.shape
    if x.shape[-1] != depth:
        raise ValueError(
            f"`x` has {x.shape[-1]} features but `table` rows have {depth}."
        )
    leading = tf.shape(x)[:-1]
    flat = tf.cast(tf.reshape(x, (-1, depth)), tf.float32)
    size = _chunk(columns, max(1, chunk_elements // depth))
    count = -(-columns // size)
    pieces = -(-depth // EXACT_DEPTH)
    bounds = [depth * p // pieces for p in range(pieces + 1)]

    def product(start):
        rows = tf.cast(tf.slice(table, [start, 0], [size, depth]), tf.float32)
        total = 0
        for low, high in zip(bounds[:-1], bounds[1:]):
            piece = tf.matmul(
                flat[:, low:high], rows[:, low:high], transpose_b=True
            )
            total += tf.cast(piece, tf.int32)
        return total

    def body(i, chunks):
        # The last chunk is moved back to fit; its repeated columns are
        # dropped below.
        start = tf.minimum(i * size, columns - size)
        return i + 1, chunks.write(i, product(start))

    chunks = tf.TensorArray(tf.int32, size=count, element_shape=(None, size))
    _, chunks = tf.while_loop(
        lambda i, _: i < count,
        body,
        (tf.constant(0), chunks),
        parallel_iterations=1,
    )
    stacked = chunks.stack()  # (count, rows, size)
    full = tf.reshape(
        tf.transpose(stacked[:-1], (1, 0, 2)),
        (tf.shape(flat)[0], (count - 1) * size),
    )
    tail = stacked[-1][:, size - (columns - (count - 1) * size) :]
    out = tf.concat([full, tail], axis=-1)
    return tf.reshape(out, tf.concat([leading, [columns]], axis=0))


def _chunk(total, per_chunk):
    """Rows per chunk: at most `per_chunk`, spread evenly over the
    chunks `total` needs."""
    count = -(-total // min(total, per_chunk))
    return -(-total // count)
