"""The token embedding, tied to the vocabulary projection.

Keras projects hidden states onto an int8 tied table as
`matmul(inputs, transpose(table))` with an int32 result. For the
257,152-row vocabulary every backend's CPU path copies the table on each
decode step: PyTorch and TensorFlow cast it to int32 (2.4 GB; TensorFlow
also transposes it, and with oneDNN on keeps the memory), and XLA:CPU
converts it to int32 at any row count. `ReversibleEmbedding` replaces
that product on CPU with one per backend that converts a bounded chunk
of the table at a time: `int8_matmul_by_blocks` (PyTorch),
`int8_matmul_jax.int8_matmul` and `int8_matmul_tf.int8_table_matmul`.

Its float projection uses `threaded_matmul` on PyTorch, and on JAX
`dense_product`: one einsum over the table's rows (Keras' `matmul(x,
transpose(table))` was loop-fused by XLA:CPU, see `call`), or on CPU, for
a few rows, `xla_few_rows`' loop. On TensorFlow CPU, where
Keras runs `generate` as a graph without XLA, the tied table's float
product for one row is compiled by XLA alone (`xla_table_matmul`): a
decode step of the 4-layer benchmark config took 110 against 122 ms with
TensorFlow's own kernel (one process, interleaved, same tokens). For a
few rows XLA's product was the slow one: the table times 2-3 rows took
137-159 ms against 70-72 for oneDNN's 2-D `transpose_b` product (which
read the table at the machine's rate) and 89-92 for its batched one, and
times 4-64 rows 1.1-1.4x the batched product's time (8 rows: 165 against
119 ms; 268 rows: level); in bfloat16 XLA took 4-5x oneDNN's time for
2-8 rows (a quarter of the table: 66-68 against 13-17 ms for either of
oneDNN's products). So 2-64 rows take TensorFlow's products
(`tensorflow_table_matmul`).
"""

import functools

import keras
from keras import ops

from keras_paligemma.layers.device import platform
from keras_paligemma.layers.int8_matmul_jax import int8_matmul
from keras_paligemma.layers.int8_matmul_tf import int8_table_matmul
from keras_paligemma.layers.threaded_matmul import MAX_ROWS
from keras_paligemma.layers.threaded_matmul import THREADED
from keras_paligemma.layers.threaded_matmul import dense_product
from keras_paligemma.layers.threaded_matmul import int8_product_is_ours
from keras_paligemma.layers.threaded_matmul import on_rows
from keras_paligemma.layers.threaded_matmul import static_row_count
from keras_paligemma.layers.threaded_matmul import tensorflow_batched_product
from keras_paligemma.layers.threaded_matmul import threaded_matmul


def int8_matmul_by_blocks(x, table, block_bytes=2**26):
    """`x @ table.T` for int8 `x (..., K)` and an int8 `table (N, K)`.

    PyTorch only. Keras computes an int8 product by casting both operands
    to int32, which for the tied 257,152-row embedding is a 2.4 GB copy
    per decode step. Here one block of `table` rows (at most `block_bytes`
    as float32) is converted at a time and multiplied with
    `threaded_matmul`. int8 products are exact in float32, so the result
    equals Keras' up to float32 rounding of sums beyond 2**24.
    """
    import torch

    x = ops.convert_to_tensor(x).to(torch.float32)
    rows_per_block = max(1, block_bytes // (4 * table.shape[1]))
    blocks = torch.split(ops.convert_to_tensor(table), rows_per_block)
    return torch.cat(
        [threaded_matmul(x, block.to(torch.float32).T) for block in blocks],
        dim=-1,
    )


@functools.cache
def _compiled_table_product(dtype):
    """One compiled function per result dtype (a shared one would be
    traced again for each dtype, and TensorFlow warns about that)."""
    import tensorflow as tf

    def product(x, table):
        x, table = tf.cast(x, dtype), tf.cast(table, dtype)
        return tf.matmul(x, table, transpose_b=True)

    return tf.function(product, jit_compile=True, reduce_retracing=True)


def xla_table_matmul(x, table):
    """`x @ table.T` for `x (..., K)` and a `table (N, K)`, on TensorFlow,
    compiled by XLA (inside a graph that is not), with `x` flattened to
    a matrix of its rows.

    Example:

    >>> x = np.arange(6, dtype="float32").reshape(1, 2, 3)
    >>> table = np.ones((4, 3), "float32")
    >>> np.asarray(xla_table_matmul(x, table)).tolist()
    [[[3.0, 3.0, 3.0, 3.0], [12.0, 12.0, 12.0, 12.0]]]
    """
    import tensorflow as tf

    x, table = tf.convert_to_tensor(x), tf.convert_to_tensor(table)
    dtype = keras.backend.result_type(x.dtype, table.dtype)  # as `ops.matmul`
    return on_rows(_compiled_table_product(dtype), x, table)


def tensorflow_table_matmul(x, table):
    """`x @ table.T` for `x (..., K)` and the tied `table (N, K)` on
    TensorFlow's CPU: 2 to `MAX_ROWS` rows take TensorFlow's own product
    (`threaded_matmul`), other row counts XLA's (`xla_table_matmul`). A
    row count unknown when the graph is traced (a serving signature's
    `None` batch) is looked at when the graph runs, and 2 to `MAX_ROWS`
    rows then take the batched product.

    Example:

    >>> table = np.ones((4, 3), "float32")
    >>> for rows in (1, 2):
    ...     x = np.ones((rows, 1, 3), "float32")
    ...     print(np.asarray(tensorflow_table_matmul(x, table)).tolist())
    [[[3.0, 3.0, 3.0, 3.0]]]
    [[[3.0, 3.0, 3.0, 3.0]], [[3.0, 3.0, 3.0, 3.0]]]
    """
    import tensorflow as tf

    rows = static_row_count(x)
    if rows is not None:
        if 2 <= rows <= MAX_ROWS:
            return threaded_matmul(x, table, transposed=True)
        return xla_table_matmul(x, table)
    count = tf.reduce_prod(tf.shape(x)[:-1])
    return tf.cond(
        (count >= 2) & (count <= MAX_ROWS),
        lambda: on_rows(tensorflow_batched_product, x, table),
        lambda: xla_table_matmul(x, table),
    )


class ReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose reverse projection (hidden
    states to logits) uses `threaded_matmul` (`dense_product` with a tied
    table on JAX), and, when int8-quantized
    with tied weights, on CPU, a product per backend that never copies
    the table (see the module docstring).

    It keeps Keras' class name on purpose: Keras' weight files key a
    functional model's layers by class name, so presets saved with the
    Keras class load into this one and the other way round.

    Example:

    >>> layer = ReversibleEmbedding(10, 4, logit_soft_cap=30.0)
    >>> tuple(layer(keras.ops.ones((1, 2, 4)), reverse=True).shape)
    (1, 2, 10)
    """

    def call(self, inputs, reverse=False):
        backend = keras.config.backend()
        jax_table = backend == "jax" and self.tie_weights
        if not reverse or (backend not in THREADED and not jax_table):
            return super().call(inputs, reverse=reverse)
        if (
            backend == "tensorflow"
            and self.tie_weights
            and self.reverse_dtype is None
            and platform() == "cpu"
        ):
            logits = tensorflow_table_matmul(inputs, self.embeddings)
            return self._soft_cap(logits)
        if self.tie_weights:
            weights = self.embeddings
        else:
            weights = self.reverse_embeddings
        if self.reverse_dtype is not None:
            inputs = ops.cast(inputs, self.reverse_dtype)
            weights = ops.cast(weights, self.reverse_dtype)
        if jax_table:
            # Keras writes `matmul(inputs, transpose(table))`. Inside a JAX
            # decode step XLA:CPU fused the transpose, the final norm and
            # the product into one loop (a `kLoop` fusion, not a matrix
            # product), which read the 2.4 GB table at about 0.8x of the
            # machine's rate: 111 of a B0 step's 179 ms. Contracting the
            # table's last axis directly compiles to a plain dot (or, for
            # a few rows, `xla_few_rows`' loop, which reads it once).
            logits = dense_product(inputs, weights, transposed=True)
        elif self.tie_weights:
            logits = threaded_matmul(inputs, ops.transpose(weights))
        else:
            logits = threaded_matmul(inputs, weights)
        return self._soft_cap(logits)

    def _int8_call(self, inputs, reverse=False):
        # Keras' reverse product has no custom gradient: ours may replace
        # it under autograd too.
        backend = keras.config.backend()
        if not (
            reverse
            and self.tie_weights
            and hasattr(self, "inputs_quantizer")
            and int8_product_is_ours(inputs, under_autograd=True, tensorflow=True)
            # JAX and TensorFlow multiply int8 inputs: Keras' quantizer.
            and (backend == "torch" or self.inputs_quantizer is not None)
        ):
            return super()._int8_call(inputs, reverse=reverse)
        if self.inputs_quantizer:
            inputs, inputs_scale = self.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=self.compute_dtype)
        if backend == "jax":
            logits = int8_matmul(inputs, self._embeddings, transposed=True)
        elif backend == "tensorflow":
            logits = int8_table_matmul(inputs, self._embeddings)
        else:
            logits = int8_matmul_by_blocks(inputs, self._embeddings)
        logits = ops.divide(
            ops.cast(logits, self.compute_dtype),
            ops.multiply(inputs_scale, self.embeddings_scale),
        )
        return self._soft_cap(logits)

    def _soft_cap(self, logits):
        if self.logit_soft_cap is None:
            return logits
        cap = self.logit_soft_cap
        return ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)

    def quantize(self, mode=None, type_check=True, **kwargs):
        # Keras refuses subclasses by default; the weights and quantizers
        # are Keras' own, so its quantization applies unchanged.
        super().quantize(mode, type_check=False, **kwargs)
