"""Exact int8 x int8 products on JAX that never copy a whole kernel.

Keras multiplies an int8-quantized layer's int8 inputs by its int8 kernel
with `preferred_element_type=int32`. XLA's CPU backend (jaxlib 0.10) runs
that natively (no copy) for two or more rows, but for one row, a decode
step, it converts the whole kernel to an int32 copy four times its size;
inside the compiled decode loop these converts are loop-invariant, so XLA
hoists them and every layer's copy is alive at once. The tied vocabulary
table (`x @ table.T`) is copied at any row count. Generating with the
int8 PaliGemma 2 3B peaked above float32 (17.0 against 15.1 GB).

`int8_matmul` keeps XLA's native product for two or more rows of a
`(K, N)` kernel. Otherwise it reads the kernel in chunks inside a
`lax.fori_loop` (2**20 elements converted to float32 or bfloat16 at a
time; one row against the table reads 16 MiB int8 chunks, which XLA
converts inside its fused product). Each chunk's start depends on the
loop counter, tied to this call's input with `optimization_barrier`, so
no convert can be hoisted, and only one chunk is converted at a time.
The result is exact: int8 values are exact in bfloat16 and float32, each
chunk sums at most `EXACT_DEPTH` products in float32
(`127**2 * 1024 < 2**24`), and the chunks are summed in int32.
"""
import math

EXACT_DEPTH = 1024
"""Most int8 x int8 products one float32 sum holds exactly."""

CHUNK_ELEMENTS = 2**20
"""Kernel elements converted at a time (4 MiB as float32)."""


def int8_matmul(x, kernel, transposed=False, chunk_elements=CHUNK_ELEMENTS):
    """int32 `x @ kernel` (or `x @ kernel.T`) of int8 operands, on JAX.

    Args:
        x: int8 `(..., K)`.
        kernel: int8 `(K, N)`, or `(N, K)` when `transposed` (a tied
            embedding table).
        transposed: multiply by `kernel.T`.
        chunk_elements: kernel elements converted at a time.

    Returns:
        int32 `(..., N)`, equal to
        `jnp.matmul(x, kernel, preferred_element_type=jnp.int32)`.

    Example:

    >>> import numpy as np
    >>> x = np.full((1, 3000), -127, "int8")
    >>> kernel = np.full((3000, 5), 127, "int8")
    >>> int(int8_matmul(x, kernel)[0, 0]) == -(127**2) * 3000
    True
    """
    import jax.numpy as jnp

    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    if x.dtype != jnp.int8 or kernel.dtype != jnp.int8:
        raise TypeError(
            "`int8_matmul` multiplies int8 operands; got `x` of dtype "
            f"{x.dtype} and `kernel` of dtype {kernel.dtype}."
        )
    leading, depth = x.shape[:-1], x.shape[-1]
    rows = math.prod(leading)
    x = x.reshape(rows, depth)
    if not transposed and rows > 1:
        out = jnp.matmul(x, kernel, preferred_element_type=jnp.int32)
    elif not transposed:
        out = _by_depth_chunks(x, kernel, chunk_elements)
    elif rows == 1:
        out = _by_table_rows_int8(x, kernel, chunk_elements)
    else:
        out = _by_table_rows(x, kernel, chunk_elements)
    return out.reshape(*leading, out.shape[-1])


def with_input_gradient_of(exact, dequantized):
    """`exact(inputs, kernel, scale)`, whose gradient with respect to
    `inputs` is that of `dequantized(inputs, kernel, scale)`.

    Keras' int8 layers differentiate their quantized product this way
    (straight through the input quantizer, with the de-quantized kernel);
    the kernel and its scale get no gradient.
    """
    import jax

    @jax.custom_vjp
    def product(inputs, kernel, scale):
        return exact(inputs, kernel, scale)

    def forward(inputs, kernel, scale):
        return exact(inputs, kernel, scale), (inputs, kernel, scale)

    def backward(saved, upstream):
        inputs, kernel, scale = saved
        _, vjp = jax.vjp(lambda x: dequantized(x, kernel, scale), inputs)
        return (*vjp(upstream), None, None)

    product.defvjp(forward, backward)
    return product


def _chunk(total, per_chunk):
    """Chunk length: a multiple of 16, at most `per_chunk`, and at least
    two chunks (a single full-size slice would be simplified away and its
    convert hoisted out of a decode loop)."""
    size = max(16, per_chunk) // 16 * 16
    return max(1, min(size, -(-total // 2)))


def _loop(count, x, body, out):
    """`fori_loop` whose body gets the chunk index tied to `x`."""
    from jax import lax

    def tied(i, out):
        i, tied_x = lax.optimization_barrier((i, x))
        return body(i, tied_x, out)

    return lax.fori_loop(0, count, tied, out)


def _by_depth_chunks(x, kernel, chunk_elements):
    """One row `x @ kernel` for a `(K, N)` kernel, over chunks of its rows
    (each contiguous) as float32 matrix-vector products, summed in int32."""
    import jax.numpy as jnp
    from jax import lax

    depth, columns = kernel.shape
    size = _chunk(depth, min(EXACT_DEPTH, chunk_elements // columns))
    count = -(-depth // size)
    dtype = jnp.float32
    x = x.astype(dtype)
    offsets = jnp.arange(size)

    def body(i, x, total):
        # The last chunk is moved back to fit; its overlap is zeroed in x.
        start = jnp.minimum(i * size, depth - size)
        chunk = lax.dynamic_slice_in_dim(kernel, start, size, 0).astype(dtype)
        x_chunk = lax.dynamic_slice_in_dim(x, start, size, 1)
        if depth % size:
            fresh = start + offsets >= i * size
            x_chunk = jnp.where(fresh, x_chunk, jnp.zeros((), dtype))
        product = jnp.matmul(x_chunk, chunk, preferred_element_type=jnp.float32)
        return total + product.astype(jnp.int32)

    zeros = jnp.zeros((x.shape[0], columns), jnp.int32)
    return _loop(count, x, body, zeros)


def _table_row_chunks(table, per_chunk, x, body):
    """Run `body(x, rows_of_table)` over chunks of the table's rows and
    place each result in its columns of the output."""
    import jax.numpy as jnp
    from jax import lax

    columns = table.shape[0]
    size = _chunk(columns, min(columns, per_chunk))
    count = -(-columns // size)

    def place(i, x, out):
        # The last chunk is moved back to fit and rewrites equal values.
        start = jnp.minimum(i * size, columns - size)
        rows = lax.dynamic_slice_in_dim(table, start, size, 0)
        return lax.dynamic_update_slice_in_dim(out, body(x, rows), start, 1)

    zeros = jnp.zeros((x.shape[0], columns), jnp.int32)
    return _loop(count, x, place, zeros)


def _by_table_rows_int8(x, table, chunk_elements):
    """One row against a `(N, K)` table: per chunk, XLA:CPU fuses the
    slice, convert and int8 matrix-vector product (no temporary)."""
    import jax.numpy as jnp

    def body(x, rows):
        return jnp.matmul(x, rows.T, preferred_element_type=jnp.int32)

    per_chunk = 16 * chunk_elements // table.shape[1]
    return _table_row_chunks(table, per_chunk, x, body)


def _by_table_rows(x, table, chunk_elements):
    """Several rows against a `(N, K)` table: chunks of table rows in
    bfloat16 (XLA:CPU's fast dot, float32 accumulation), the contraction in
    static pieces of at most `EXACT_DEPTH`."""
    import jax.numpy as jnp
    from jax import lax

    depth = table.shape[1]
    dtype = jnp.bfloat16
    pieces = -(-depth // EXACT_DEPTH)
    bounds = [depth * p // pieces for p in range(pieces + 1)]

    def body(x, rows):
        rows = rows.astype(dtype)
        total = 0
        for start, stop in zip(bounds[:-1], bounds[1:]):
            product = lax.dot_general(
                x[:, start:stop],
                rows[:, start:stop],
                (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )
            total = total + product.astype(jnp.int32)
        return total

    per_chunk = chunk_elements // depth
    return _table_row_chunks(table, per_chunk, x.astype(dtype), body)
