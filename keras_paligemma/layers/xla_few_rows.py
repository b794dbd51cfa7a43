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

This needs XLA:CPU to fuse the reduction (in jaxlib 0.10 a YNNPACK
fusion); without it (`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`,
older or future jaxlibs) XLA writes the whole `(N, rows, K)` product out:
FFW gate times 8 rows took 211 against 15 ms for the `dot`. So `applies`
compiles a small loop once per process and dtype and takes it only if
its scratch memory stayed far below that product (`fuses`). float16 is
left to the `dot`: XLA wrote a float32 copy of the kernel first.

One float32 row stays a `dot` (the loop took 12.9 s for the table: XLA
lowers a one-row reduction otherwise); one bfloat16 row is repeated to
two. The loop accumulates in float32 and rounds to the result dtype once,
as the `dot` does; the sums run in another order, so results equal the
`dot`'s to float rounding. It is compiled on its own (`jax.jit`), so an
eager call, too, never builds the product. Derivatives are the usual
products (`jax.custom_jvp`, with symbolic zeros for an operand that is
not differentiated): the loop is for inference-sized row counts.

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

DTYPES = ("float32", "bfloat16")
"""Result dtypes the loop was measured faster in."""


def applies(rows, dtype):
    """Whether `rows` rows with result `dtype`, on JAX's CPU, take the
    fused loop: 2 to `MAX_ROWS` float32 rows or 1 to `MAX_ROWS` bfloat16
    ones, where XLA fuses it (`fuses`)."""
    dtype = str(dtype)
    if rows is None or rows > MAX_ROWS or dtype not in DTYPES:
        return False
    return rows >= (2 if dtype == "float32" else 1) and fuses(dtype)


FUSED_SCRATCH = 1 / 16
"""`fuses` accepts scratch memory below this fraction of the product."""


@functools.cache
def fuses(dtype):
    """Whether XLA compiles the loop over 8 rows of `dtype` and a `(4096,
    512)` table without writing out the `(4096, 8, 512)` float32 product
    (its scratch memory is below `FUSED_SCRATCH` of that); once per
    process and dtype, in about 0.1 s."""
    import jax

    rows, size, depth = 8, 4096, 512
    x = jax.ShapeDtypeStruct((rows, depth), dtype)
    table = jax.ShapeDtypeStruct((size, depth), dtype)
    analysis = jax.jit(_loop).lower(x, table).compile().memory_analysis()
    if analysis is None:  # not reported: assume the worst
        return False
    return analysis.temp_size_in_bytes < FUSED_SCRATCH * size * rows * depth * 4


def _loop(x, table):
    """The fused loop: `x @ table.T`, table rows outermost."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.result_type(x, table)
    x, table = jax.lax.optimization_barrier((x, table))
    rows = x.shape[0]
    if rows == 1:
        x = jnp.concatenate([x, x])
    wide = table[:, None, :].astype("float32") * x[None].astype("float32")
    return jnp.sum(wide, axis=-1).T[:rows].astype(dtype)


@functools.cache
def _product():
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero

    loop = jax.jit(_loop)

    @jax.custom_jvp
    def product(x, table):
        return loop(x, table)

    def derivative(primals, tangents):
        x, table = primals
        x_tangent, table_tangent = tangents
        out = loop(x, table)
        terms = [
            jnp.einsum("rk,nk->rn", rows, kernel).astype(out.dtype)
            for rows, kernel in ((x_tangent, table), (x, table_tangent))
            if not isinstance(rows, SymbolicZero)
            and not isinstance(kernel, SymbolicZero)
        ]
        if not terms:
            return out, jnp.zeros(out.shape, out.dtype)
        return out, sum(terms[1:], terms[0])

    product.defjvp(derivative, symbolic_zeros=True)
    return product


def few_rows_product(x, table):
    """`x @ table.T` for rows `x (rows, K)` and `table (N, K)`, as XLA's
    fused loop (module docstring); `(rows, N)` in the operands' result
    dtype. Callers check `applies` first."""
    return _product()(x, table)
