"""Decode-sized matmuls that use every CPU thread on PyTorch.

On PyTorch's CPU build, MKL computes a matrix product with one or a few
rows (a decode step: one token per sequence) on a single thread, so it
reads the weights at a fraction of the machine's memory bandwidth. Split
into one column block per thread and run as one batched matmul, the same
product uses all of PyTorch's threads: on a 2-core machine the 2304 x 9216
FFW kernel or the 257,152-row vocabulary projection is about 1.7-2x faster
for 1-8 rows (`tools/benchmark.py` measures the whole decode step).

The blocks are views of the kernel (nothing is copied) and every output
element is the same dot product, so results match `x @ kernel` to float
rounding. Other backends, devices and matmuls with many rows (prefill,
training) take the ordinary path; XLA already spreads them over threads.

`ThreadedEinsumDense` and `ReversibleEmbedding` are drop-in
subclasses of the Keras layers that take this path in their float call;
quantized calls (int8, int4) are Keras' own and unchanged.
"""

import math

import keras
from keras import ops

MAX_ROWS = 64
"""Above this many rows MKL's own threading is close (measured ~0.85x)."""


def _thread_blocks(columns):
    """Largest block count <= PyTorch's thread count dividing `columns`."""
    import torch

    threads = torch.get_num_threads()
    for blocks in range(min(threads, columns), 1, -1):
        if columns % blocks == 0:
            return blocks
    return 1


def threaded_matmul(x, kernel):
    """`x @ kernel` for `x (..., K)` and `kernel (K, N)`.

    On PyTorch CPU with at most `MAX_ROWS` rows the product is computed as
    one batched matmul over column blocks of `kernel`; elsewhere it is
    `ops.matmul`.

    Example:

    >>> x = keras.random.normal((1, 1, 8))
    >>> kernel = keras.random.normal((8, 6))
    >>> out = threaded_matmul(x, kernel)
    >>> tuple(out.shape)
    (1, 1, 6)
    >>> bool(ops.all(ops.abs(out - ops.matmul(x, kernel)) < 1e-4))
    True
    """
    if keras.config.backend() != "torch":
        return ops.matmul(x, kernel)
    import torch

    x = ops.convert_to_tensor(x)
    kernel = ops.convert_to_tensor(kernel)
    depth, columns = kernel.shape
    rows = math.prod(x.shape[:-1])
    blocks = _thread_blocks(columns)
    if x.device.type != "cpu" or rows > MAX_ROWS or blocks == 1:
        return torch.matmul(x, kernel)
    flat = x.reshape(1, rows, depth).expand(blocks, rows, depth)
    kernel_blocks = kernel.reshape(depth, blocks, columns // blocks)
    out = torch.bmm(flat, kernel_blocks.permute(1, 0, 2))
    return out.permute(1, 0, 2).reshape(*x.shape[:-1], columns)


def _split_einsum(equation):
    """`(batch_letters, contracted_letters, output_letters)` of an einsum
    `"<batch><contracted>,<contracted><out>-><batch><out>"`, else None."""
    inputs, output = equation.replace(" ", "").split("->")
    left, kernel = inputs.split(",")
    contracted = "".join(c for c in kernel if c not in output)
    kept = kernel[len(contracted) :]
    batch = left[: len(left) - len(contracted)]
    if (
        not contracted
        or "." in equation
        or left != batch + contracted
        or kernel != contracted + kept
        or output != batch + kept
    ):
        return None
    return batch, contracted, kept


class ThreadedEinsumDense(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose float call uses `threaded_matmul`.

    Applies to equations that contract the input's trailing axes with the
    kernel's leading axes (`"btd,dnh->btnh"`, `"btnh,nhd->btd"`); any
    other equation, and every quantized call, is Keras' own.

    Example:

    >>> layer = ThreadedEinsumDense("btd,df->btf", (None, 6))
    >>> tuple(layer(keras.ops.ones((2, 1, 8))).shape)
    (2, 1, 6)
    """

    def __init__(self, equation, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._matmul_axes = _split_einsum(equation)

    def call(self, inputs, training=None):
        if keras.config.backend() != "torch" or self._matmul_axes is None:
            return super().call(inputs, training=training)
        batch, contracted, kept = self._matmul_axes
        kernel = self.kernel
        kept_shape = tuple(kernel.shape[len(contracted) :])
        leading = tuple(inputs.shape[: len(batch)])
        x = ops.reshape(inputs, (*leading, -1))
        kernel = ops.reshape(kernel, (-1, math.prod(kept_shape)))
        x = ops.reshape(threaded_matmul(x, kernel), (*leading, *kept_shape))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default; only the float call differs
        # here, so Keras' quantized layer applies unchanged.
        super().quantize(mode, type_check=False, config=config)


class ReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose float reverse projection
    (hidden states to logits) uses `threaded_matmul`.

    It keeps Keras' class name on purpose: Keras' weight files key a
    functional model's layers by class name, so presets saved with the
    Keras class load into this one and the other way round.

    Example:

    >>> layer = ReversibleEmbedding(10, 4, logit_soft_cap=30.0)
    >>> tuple(layer(keras.ops.ones((1, 2, 4)), reverse=True).shape)
    (1, 2, 10)
    """

    def call(self, inputs, reverse=False):
        if keras.config.backend() != "torch" or not reverse:
            return super().call(inputs, reverse=reverse)
        if self.tie_weights:
            kernel = ops.transpose(self.embeddings)
        else:
            kernel = self.reverse_embeddings
        if self.reverse_dtype is not None:
            inputs = ops.cast(inputs, self.reverse_dtype)
            kernel = ops.cast(kernel, self.reverse_dtype)
        logits = threaded_matmul(inputs, kernel)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

    def quantize(self, mode=None, type_check=True, config=None):
        # Keras refuses subclasses by default; only the float call differs
        # here, so Keras' quantized layer applies unchanged.
        super().quantize(mode, type_check=False, config=config)
