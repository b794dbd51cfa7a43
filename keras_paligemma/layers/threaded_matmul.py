"""Matmuls that read the weights fast on CPU: PyTorch, TensorFlow and JAX.

PyTorch's float32 CPU product (MKL) can be slow for the shapes
inference has, depending on the machine: on one host this project ran
on, one row (a decode step, one token per sequence) ran on a single
thread, and a few to a few hundred rows (batched decode, prefill) reached
40-160 GFLOP/s on 2 cores, against about 200 for oneDNN and XLA; on
another, MKL was the faster of the two for several rows. So, on PyTorch
CPU:

- Outside autograd (generation, prediction), float32 products of two or
  more rows go through oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`,
  the kernel PyTorch's own compiler emits for linear layers; it reads
  the weights in place) or MKL's, whichever multiplied this model's
  shapes faster when measured once in the process (`onednn.beats_mkl`);
  the transposed vocabulary table always takes oneDNN's. On the first
  host oneDNN took 0.50-0.84x MKL's time for 2-268 rows, and 0.83-0.99x
  for 1024-2144 rows. oneDNN's is checked once against `torch.matmul`
  and skipped if missing or different.
- Other products of at most `MAX_ROWS` rows (one row; autograd; other
  dtypes) are split into one block per thread and run as one batched
  matmul. In float32 each block is a contiguous slice of the weights: a
  `(K, N)` kernel is split along K, its rows (the partial products are
  summed); a transposed `(N, K)` table (the tied 257,152-row vocabulary
  projection, `table.T`, and the decoder's output-first kernels) along
  N, the table's rows, one row taking the side of `torch.bmm` that
  measured faster (`row_product.py`). Contiguous slices
  matter: column blocks (strided rows) read the vocabulary table at 31
  against 37 GB/s, and a decode step of the 4-layer benchmark config took
  130-141 against 93-99 ms. In bfloat16/float16, where summing partial
  products would round twice, a kernel is split into column blocks.

On TensorFlow (a graph without XLA on CPU-only machines, Keras' default
there), oneDNN runs a 3-D `x` against a 2-D kernel as a batched matmul,
which read this model's kernels at 17-19 GB/s against 24-32 for the
same product with `x` flattened to a matrix of its rows; so
`threaded_matmul` flattens it. With the tied table's product for one row
compiled by XLA as well (`reversible_embedding.tensorflow_table_matmul`;
2-64 rows take the product here), a decode step of
the 4-layer benchmark config took 110 against 134 ms with Keras' layers
(122 with only the flattening; one process, interleaved, same tokens).
Many rows times an output-first kernel go the other way: as a batched
matmul of one batch (`TENSORFLOW_BATCHED_ROWS`), which took the time to
first token of the same config from 1061-1070 to 927-928 ms (keras-hub:
979-1002).

On JAX, `dense_product` multiplies: on CPU a few rows times an
output-first kernel as `xla_few_rows`' fused loop, else one einsum.

Results equal `x @ kernel` (or `x @ kernel.T` for output-first kernels)
to float rounding. Other devices and other products take the ordinary
path.

The dense layers that use these products are in `threaded_dense.py`.
"""

import math

import keras
from keras import ops

from keras_paligemma.layers import eager_ops
from keras_paligemma.layers import onednn
from keras_paligemma.layers import xla_few_rows
from keras_paligemma.layers.device import platform
from keras_paligemma.layers.row_product import table_rows_product

THREADED = ("torch", "tensorflow")
"""Backends whose float layer calls go through `threaded_matmul`."""

MAX_ROWS = 64
"""Above this many rows MKL's own threading is close (measured ~0.85x)."""


def _thread_blocks(size):
    """Largest block count <= PyTorch's thread count dividing `size`."""
    import torch

    threads = torch.get_num_threads()
    for blocks in range(min(threads, size), 1, -1):
        if size % blocks == 0:
            return blocks
    return 1


def threaded_matmul(x, kernel, transposed=False):
    """`x @ kernel` for `x (..., K)` and `kernel (K, N)`, or `x @ kernel.T`
    for a `(N, K)` kernel when `transposed` (the decoder's kernels,
    `kernel_layout.py`).

    On PyTorch CPU: for two or more float32 rows outside autograd,
    oneDNN's linear, or MKL's (`torch.matmul`) for a kernel (`(K, N)`,
    or `(N, K)` with `transposed`) where it measured faster (`onednn.beats_mkl`); else, for at most
    `MAX_ROWS` rows, one batched matmul over
    contiguous blocks of `kernel` (its rows, or the rows of the table it
    transposes). On TensorFlow: one 2-D product of `x`'s rows, or for
    many rows times an output-first kernel a batched one
    (`TENSORFLOW_BATCHED_ROWS`). Elsewhere `ops.matmul`. See the module
    docstring.

    Example:

    >>> x = keras.random.normal((1, 1, 8), seed=0)
    >>> kernel = keras.random.normal((8, 6), seed=1)
    >>> out = threaded_matmul(x, kernel)
    >>> tuple(out.shape)
    (1, 1, 6)
    >>> bool(ops.all(ops.abs(out - ops.matmul(x, kernel)) < 1e-4))
    True
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        return on_rows(_tensorflow_product(transposed), x, kernel)
    if backend != "torch":
        return dense_product(x, kernel, transposed)
    import torch

    x, kernel = eager_ops.tensor(x), eager_ops.tensor(kernel)
    if transposed:
        kernel = kernel.T  # A view: the blocks below read it in place.
    dtype = torch.promote_types(x.dtype, kernel.dtype)  # as `ops.matmul`
    x, kernel = x.to(dtype), kernel.to(dtype)
    depth, columns = kernel.shape
    rows = math.prod(x.shape[:-1])
    if x.device.type != "cpu":
        return torch.matmul(x, kernel)
    if onednn.applies(x, kernel, rows):
        # A kernel (`(K, N)`, or `(N, K)` with `transposed`) takes the
        # faster product here; the vocabulary table took oneDNN's (at 8-32
        # rows 145-254 against 281-322 ms for MKL's, on the host where MKL
        # won above).
        if (transposed or kernel.is_contiguous()) and not onednn.beats_mkl():
            return torch.matmul(x, kernel)
        out = onednn.linear()(x.reshape(rows, depth), kernel)
        return out.reshape(*x.shape[:-1], columns)
    if rows > MAX_ROWS:
        return torch.matmul(x, kernel)
    flat = x.reshape(rows, depth)
    split_depth = kernel.is_contiguous() and dtype == torch.float32
    if split_depth and (blocks := _thread_blocks(depth)) > 1:
        # Each block: `depth / blocks` consecutive kernel rows.
        x_blocks = flat.reshape(rows, blocks, depth // blocks).transpose(0, 1)
        kernel_blocks = kernel.reshape(blocks, depth // blocks, columns)
        out = torch.bmm(x_blocks, kernel_blocks).sum(0)
    elif kernel.is_contiguous() and (blocks := _thread_blocks(columns)) > 1:
        # bfloat16/float16 would round each partial sum: column blocks
        # compute exactly the dot products of `x @ kernel` instead.
        kernel_blocks = kernel.reshape(depth, blocks, columns // blocks)
        out = torch.bmm(
            flat.expand(blocks, rows, depth), kernel_blocks.transpose(0, 1)
        )
        out = out.transpose(0, 1).reshape(rows, columns)
    elif kernel.T.is_contiguous() and (blocks := _thread_blocks(columns)) > 1:
        # Each block: `columns / blocks` consecutive rows of the table,
        # one row on the side of `x` that measured faster (`row_product.py`).
        table_blocks = kernel.T.reshape(blocks, columns // blocks, depth)
        out = table_rows_product(flat, table_blocks)
    else:
        return torch.matmul(x, kernel)
    return out.reshape(*x.shape[:-1], columns)


def dense_product(x, kernel, transposed=False):
    """`ops.matmul(x, kernel)`, or `x @ kernel.T` when `transposed`: an
    einsum over both last axes (on JAX one `dot_general` that reads the
    kernel in place; `matmul(x, transpose(kernel))` was fused by XLA:CPU
    into an element loop when it followed a normalization). On JAX's CPU,
    a few rows times an output-first kernel take `xla_few_rows`' fused
    loop, which reads the kernel once."""
    if not transposed:
        return ops.matmul(x, kernel)
    if keras.config.backend() == "jax" and platform() == "cpu":
        # Sizes may be symbolic while Keras infers output shapes: those
        # keep the einsum.
        rows = static_row_count(x)
        dtype = keras.backend.result_type(x.dtype, kernel.dtype)
        if xla_few_rows.applies(rows, dtype):
            flat = ops.reshape(x, (rows, x.shape[-1]))
            kernel = ops.convert_to_tensor(kernel)
            out = xla_few_rows.few_rows_product(flat, kernel)
            return ops.reshape(out, (*x.shape[:-1], kernel.shape[0]))
    return ops.einsum("...k,nk->...n", x, kernel)


def static_row_count(x):
    """The number of rows of `x (..., K)` if its shape says, else None
    (a size unknown when a graph is traced, or symbolic)."""
    leading = tuple(x.shape[:-1])
    if all(isinstance(size, int) for size in leading):
        return math.prod(leading)
    return None


TENSORFLOW_BATCHED_ROWS = 16
"""From this many rows TensorFlow multiplies an output-first kernel as a
batched matmul of one batch (`adjoint_b`), and from
`TENSORFLOW_BATCHED_BIG_ROWS` rows a kernel of at least
`TENSORFLOW_BIG_KERNEL` elements. A row count unknown when the graph is
traced (a serving signature's `None` batch) keeps the 2-D product, the
faster one for a decode step. oneDNN's batched matmul reached 204
GFLOP/s at 268 rows where the 2-D `transpose_b` one reached 192 (and 143
for the FFW's `down`: 56 against 80 ms); the FFW kernels times 4-64 rows
took 0.3-0.8x the 2-D product's time. One or two rows, and the smaller
kernels at 4-8 rows, were faster in 2-D (one row times an FFW kernel: 2.5
against 4.7 ms)."""

TENSORFLOW_BATCHED_BIG_ROWS = 4
TENSORFLOW_BIG_KERNEL = 2**24


def _tensorflow_product(transposed):
    """TensorFlow's 2-D `matmul`; for a `(N, K)` kernel, its `transpose_b`
    or, for many rows, the batched matmul (`TENSORFLOW_BATCHED_ROWS`)."""
    if not transposed:
        return ops.matmul
    import tensorflow as tf

    def product(rows, kernel):
        kernel = ops.convert_to_tensor(kernel)
        if _tensorflow_batches(rows.shape[0], kernel.shape.num_elements()):
            return tensorflow_batched_product(rows, kernel)
        rows, kernel = _common_dtype(rows, kernel)
        return tf.linalg.matmul(rows, kernel, transpose_b=True)

    return product


def tensorflow_batched_product(rows, kernel):
    """`rows @ kernel.T` for `rows (M, K)` and a `(N, K)` kernel on
    TensorFlow, as oneDNN's batched matmul of one batch (see
    `TENSORFLOW_BATCHED_ROWS`)."""
    import tensorflow as tf

    rows, kernel = _common_dtype(rows, kernel)
    return tf.linalg.matmul(rows[None], kernel[None], adjoint_b=True)[0]


def _common_dtype(rows, kernel):
    """Both operands in the dtype `ops.matmul` would give the result."""
    rows, kernel = ops.convert_to_tensor(rows), ops.convert_to_tensor(kernel)
    dtype = keras.backend.result_type(rows.dtype, kernel.dtype)
    return ops.cast(rows, dtype), ops.cast(kernel, dtype)


def _tensorflow_batches(row_count, kernel_size):
    if row_count is None:
        return False
    if row_count >= TENSORFLOW_BATCHED_ROWS:
        return True
    return (
        row_count >= TENSORFLOW_BATCHED_BIG_ROWS
        and kernel_size is not None
        and kernel_size >= TENSORFLOW_BIG_KERNEL
    )


def on_rows(product, x, kernel):
    """`product(rows, kernel)` with `x (..., K)` flattened to a matrix of
    its rows, the result shaped back to `(..., N)`."""
    shape = ops.shape(x)
    out = product(ops.reshape(x, (-1, shape[-1])), kernel)
    return ops.reshape(out, (*shape[:-1], ops.shape(out)[-1]))


def int8_product_is_ours(inputs, under_autograd=False, tensorflow=False):
    """Whether our exact int8 product may replace Keras' for `inputs`: on
    CPU, with JAX, with PyTorch outside autograd unless `under_autograd`,
    and with TensorFlow when `tensorflow` (the tied table only)."""
    backend = keras.config.backend()
    backends = ("jax", "torch", "tensorflow") if tensorflow else ("jax", "torch")
    if backend not in backends or platform(inputs) != "cpu":
        return False
    if backend == "torch" and not under_autograd:
        import torch

        return not torch.is_grad_enabled()
    return True
