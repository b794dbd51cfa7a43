"""A few rows times an output-first kernel on XLA:CPU (JAX), read once.

Batched decoding multiplies 2-64 rows (one per sequence) by each of the
decoder's output-first kernels and by the tied vocabulary table, `x (rows,
K) @ table.T` for a `table (N, K)`. XLA:CPU runs that `dot` far slower
than one row: PaliGemma 2's vocabulary table (2.4 GB) times 8 float32
rows took 176-197 ms against 67-70 ms for one row, and 150 ms in the
input-first layout keras-hub uses. Written as an elementwise product
summed over `K`, with the table's axis outermost, XLA emits one fused
loop that reads each table row once and multiplies it by every `x` row
while it is in cache: 105 ms for 8 rows. In bfloat16 the gain is larger
still, XLA:CPU's bfloat16 `dot` being slow at any row count:

| product (ms, best of 7, 2 cores) | `dot` | fused loop |
|---|---|---|
| FFW gate (9216, 2304), 2 / 8 / 32 float32 rows | 5.5 / 6.7 / 12.4 | 3.6 / 3.9 / 8.6 |
| FFW down (2304, 9216), 2 / 8 / 32 float32 rows | 7.5 / 8.7 / 13.1 | 3.6 / 4.0 / 8.8 |
| table, 2 / 8 / 32 / 64 float32 rows | 148 / 176 / 317 / 499 | 94 / 105 / 236 / 436 |
| table, 1 / 8 bfloat16 rows | 687 / 819 | 80 / 92 |

Two such products of the same rows (gate and up, or query, key and
value) would broadcast the rows alike, and XLA merged the two broadcasts
into one array it wrote out (`(N, rows, K)`, 680 MB for the FFW at 8
rows: 989 ms for gate and up). So the rows and the table pass through
one `optimization_barrier` first, which keeps each product's broadcast
its own (7.5 ms for gate and up, against 12.5 for the `dot`s) and
computes the rows once, not in the loop.

These are XLA:CPU's fusions in jaxlib 0.10 (its reductions run as YNNPACK
fusions); older jaxlibs (`MIN_JAXLIB`) keep the `dot`.

One float32 row stays a `dot` (the loop took 12.9 s for the table: XLA
lowers a one-row reduction otherwise); one 16-bit row is repeated to two.
The loop accumulates in float32 and rounds to the result dtype once, as
the `dot` does; the sums run in another order, so results equal the
`dot`'s to float rounding. Gradients are the usual two products
(`jax.custom_vjp`): the loop is for inference-sized row counts.

Example:

>>> import numpy as np
>>> x, table = np.ones((2, 3), "float32"), np.ones((4, 3), "float32")
>>> np.asarray(few_rows_product(x, table)).tolist()
[[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]
"""

import functools

MAX_ROWS = 64
"""Most rows the fused loop takes: at 64 it took 0.87x the `dot`'s time,
close enough that more rows (not measured) keep the `dot`."""

MIN_JAXLIB = (0, 10)
"""The jaxlib (major, minor) the loop was measured faster with."""


def jaxlib_version():
    """The installed jaxlib's `(major, minor)`."""
    import jaxlib

    major, minor = jaxlib.__version__.split(".")[:2]
    return int(major), int(minor)


def applies(rows, dtype):
    """Whether `rows` rows of `dtype` (floating, on JAX's CPU) take the
    fused loop: 2 to `MAX_ROWS` float32 rows, 1 to `MAX_ROWS` 16-bit
    ones, with jaxlib `MIN_JAXLIB` or newer; float64 and other dtypes
    keep the `dot`."""
    if rows is None or rows > MAX_ROWS or jaxlib_version() < MIN_JAXLIB:
        return False
    if str(dtype) == "float32":
        return rows >= 2
    return str(dtype) in ("bfloat16", "float16") and rows >= 1


@functools.cache
def _product():
    import jax
    import jax.numpy as jnp

    def loop(x, table):
        dtype = jnp.result_type(x, table)
        x, table = jax.lax.optimization_barrier((x, table))
        rows = x.shape[0]
        if rows == 1:
            x = jnp.concatenate([x, x])
        products = table[:, None, :].astype("float32") * x[None].astype(
            "float32"
        )
        out = jnp.sum(products, axis=-1).T[:rows]
        return out.astype(dtype)

    @jax.custom_vjp
    def product(x, table):
        return loop(x, table)

    def forward(x, table):
        return loop(x, table), (x, table)

    def backward(saved, grad):
        x, table = saved
        grad_x = jnp.einsum("rn,nk->rk", grad, table)
        grad_table = jnp.einsum("rn,rk->nk", grad, x)
        return grad_x.astype(x.dtype), grad_table.astype(table.dtype)

    product.defvjp(forward, backward)
    return product


def few_rows_product(x, table):
    """`x @ table.T` for rows `x (rows, K)` and `table (N, K)`, as XLA's
    fused loop (module docstring); `(rows, N)` in the operands' result
    dtype. Callers check `applies` first."""
    return _product()(x, table)
