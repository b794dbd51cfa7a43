"""One row times a table's row blocks on PyTorch CPU, the faster way round.

A decode step multiplies one row `x (1, K)` by every output-first kernel
and by the tied vocabulary table, each `(N, K)` and split into contiguous
blocks of rows, one per thread (`threaded_matmul`). `torch.bmm` can take
the blocks on either side, and which side MKL reads faster depends on the
machine and on `K`:

| host, K | table on the left | `x` on the left |
|---|---|---|
| one host, table (K = 2304) | 11-13 GB/s | 25 GB/s |
| another, table (K = 2304) | 32-55 GB/s | 26-32 GB/s |
| the same, FFW `down` (K = 9216) | 27-28 GB/s | 42-43 GB/s |

So each `(blocks, K, dtype)` takes the table-on-the-left side where it
multiplied at least `MARGIN` times faster when measured once in the
process (`table_on_left`, on constant operands of about 96 MiB, past the
caches as the real weights are), else `x` on the left. The first
`generate` pays for the measurements: about 0.05-0.1 s for each row
length (three for PaliGemma 2's decoder: 2048, 2304 and 9216).

Both sides compute the same dot products, summed in another order: equal
to float rounding (up to about 1e-4 apart for float32 rows of 2304-9216
random values), so logits may differ at that level between processes
that measured differently.

Example:

>>> import torch
>>> x, table = torch.ones(1, 4), torch.ones(2, 3, 4)
>>> tuple(table_rows_product(x, table).shape)
(1, 6)
"""

import functools

from keras_paligemma.layers.onednn import faster

MEASURED_BYTES = 96 * 2**20
"""Size of the table `table_on_left` times: past the last-level cache."""

MARGIN = 1.1
"""How much faster the table on the left must be to be taken: a busy
moment during the measurement does not switch the side."""


def table_rows_product(flat, table_blocks):
    """`flat @ table.T` for rows `flat (rows, K)` and `table_blocks
    (blocks, block_rows, K)`, the table's consecutive row blocks: one
    batched product, `(rows, blocks * block_rows)`. One row takes the
    side `table_on_left` measured faster."""
    blocks, _, depth = table_blocks.shape
    rows = flat.shape[0]
    if rows == 1 and table_on_left(blocks, depth, table_blocks.dtype):
        return _table_left(flat, table_blocks)
    return _rows_left(flat, table_blocks)


def _table_left(row, table_blocks):
    """One row: `(blocks, block_rows, 1)` dot products, in the table's
    row order."""
    import torch

    blocks, _, depth = table_blocks.shape
    out = torch.bmm(table_blocks, row.T.expand(blocks, depth, 1))
    return out.reshape(1, -1)


def _rows_left(flat, table_blocks):
    import torch

    blocks, block_rows, depth = table_blocks.shape
    rows = flat.shape[0]
    out = torch.bmm(
        flat.expand(blocks, rows, depth), table_blocks.transpose(1, 2)
    )
    return out.transpose(0, 1).reshape(rows, blocks * block_rows)


@functools.cache
def table_on_left(blocks, depth, dtype):
    """Whether one row times `blocks` row blocks of width `depth` runs
    `MARGIN` times faster with the blocks on the left of `torch.bmm`;
    measured once per process and argument set, in about 0.05-0.1 s."""
    import torch

    block_rows = max(1, MEASURED_BYTES // (blocks * depth * dtype.itemsize))
    # Constant operands: the user's random stream is left alone.
    table_blocks = torch.full((blocks, block_rows, depth), 0.25, dtype=dtype)
    flat = torch.full((1, depth), 0.5, dtype=dtype)
    with torch.no_grad():
        return faster(
            lambda: _table_left(flat, table_blocks),
            lambda: _rows_left(flat, table_blocks),
            margin=MARGIN,
        )
