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
  projection, `table.T`) along N, the table's rows. Contiguous slices
  matter: column blocks (strided rows) read the vocabulary table at 31
  against 37 GB/s, and a decode step of the 4-layer benchmark config took
  130-141 against 93-99 ms. In bfloat16/float16, where summing partial
  products would round twice, a kernel is split into column blocks.

On TensorFlow (a graph without XLA on CPU-only machines, Keras' default
there), oneDNN runs a 3-D `x` against a 2-D kernel as a batched matmul,
which read this model's kernels at 17-19 GB/s against 24-32 for the
same product with `x` flattened to a matrix of its rows; so
`threaded_matmul` flattens it. With the tied table's product compiled by
XLA as well (`reversible_embedding.xla_table_matmul`), a decode step of
the 4-layer benchmark config took 110 against 134 ms with Keras' layers
(122 with only the flattening; one process, interleaved, same tokens).

On JAX CPU, `ThreadedEinsumDense` computes its float einsum as one
product of the operands flattened to 2-D as well (`threaded_matmul` is
`ops.matmul` there). Given the attention output projection's einsum
(`"btnh,nhd->btd"`) after the attention, XLA:CPU chose to copy the
kernel into the head order of the attention output on every call, a
decode step included (19 MB per layer for PaliGemma 2 3B); with the
heads flattened the kernel is read in place. Against Keras' einsum, in
one process with the same weights, interleaved, same tokens, batch 1:
decode of the 4-layer benchmark config took 115-125 against 127-132
ms/token in five pairs; with 12 decoder layers 221-230 against 225-247
ms/token and time to first token 2683-2708 against 2785-3064 ms in four
pairs. At batch 8 (compute-bound) the difference was within noise.

Results equal `x @ kernel` to float rounding. Other backends and devices,
and other products, take the ordinary path.

`ThreadedEinsumDense` and `ThreadedDense` are drop-in subclasses of the
Keras layers that take this path in their float call (the tied embedding
is `reversible_embedding.ReversibleEmbedding`). int8-quantized, they
replace Keras' int8 x int8 product with an exact one that never copies a
whole kernel: on PyTorch CPU (outside autograd) as float32 products,
since Keras' int32 product is slow there; on JAX CPU with
`int8_matmul_jax.int8_matmul` (differentiated as Keras' call), since
XLA:CPU makes an int32 copy of every kernel for a one-row product. Other
quantized calls are Keras' own.
"""

import math

import keras
from keras import ops

from keras_paligemma.layers import onednn
from keras_paligemma.layers.device import platform
from keras_paligemma.layers.int8_matmul_jax import int8_matmul
from keras_paligemma.layers.int8_matmul_jax import with_input_gradient_of

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


def threaded_matmul(x, kernel):
    """`x @ kernel` for `x (..., K)` and `kernel (K, N)`.

    On PyTorch CPU: for two or more float32 rows outside autograd,
    oneDNN's linear, or MKL's (`torch.matmul`) for a `(K, N)` kernel where
    it measured faster (`onednn.beats_mkl`); else, for at most
    `MAX_ROWS` rows, one batched matmul over
    contiguous blocks of `kernel` (its rows, or the rows of the table it
    transposes). On TensorFlow: one 2-D product of `x`'s rows. Elsewhere
    `ops.matmul`. See the module docstring.

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
        return on_rows(ops.matmul, x, kernel)
    if backend != "torch":
        return ops.matmul(x, kernel)
    import torch

    x = ops.convert_to_tensor(x)
    kernel = ops.convert_to_tensor(kernel)
    dtype = torch.promote_types(x.dtype, kernel.dtype)  # as `ops.matmul`
    x, kernel = x.to(dtype), kernel.to(dtype)
    depth, columns = kernel.shape
    rows = math.prod(x.shape[:-1])
    if x.device.type != "cpu":
        return torch.matmul(x, kernel)
    if onednn.applies(x, kernel, rows):
        # A contiguous `(K, N)` kernel takes the faster product here; the
        # transposed vocabulary table took oneDNN's (at 8-32 rows 145-254
        # against 281-322 ms for MKL's, on the host where MKL won above).
        if kernel.is_contiguous() and not onednn.beats_mkl():
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
        # the rows of `x` on the left (`table_block @ x.T` read the
        # vocabulary table at 11-13 against 25 GB/s on this machine).
        table_blocks = kernel.T.reshape(blocks, columns // blocks, depth)
        out = torch.bmm(
            flat.expand(blocks, rows, depth), table_blocks.transpose(1, 2)
        )
        out = out.transpose(0, 1).reshape(rows, columns)
    else:
        return torch.matmul(x, kernel)
    return out.reshape(*x.shape[:-1], columns)


def on_rows(product, x, kernel):
    """`product(rows, kernel)` with `x (..., K)` flattened to a matrix of
    its rows, the result shaped back to `(..., N)`."""
    shape = ops.shape(x)
    out = product(ops.reshape(x, (-1, shape[-1])), kernel)
    return ops.reshape(out, (*shape[:-1], ops.shape(out)[-1]))


def _reshape(x, shape):
    """`ops.reshape(x, shape)`; on PyTorch, the tensor's own reshape.

    PyTorch runs `generate` eagerly, so each Keras op's dispatch is paid
    on every decode step: `ops.reshape` took 27 against 1 us for the
    tensor's own, and a dense layer reshapes three times.
    """
    if keras.config.backend() == "torch":
        return ops.convert_to_tensor(x).reshape(shape)
    return ops.reshape(x, shape)


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


def _flattens(inputs):
    """Whether `ThreadedEinsumDense`'s float call is one product of the
    flattened operands: on PyTorch and TensorFlow (`threaded_matmul`) and
    on JAX CPU (one 2-D dot, see the module docstring)."""
    backend = keras.config.backend()
    if backend == "jax":
        return platform(inputs) == "cpu"
    return backend in THREADED


def _product(x, kernel, product=None):
    """`(product or threaded_matmul)(x, kernel)`: `ThreadedDense`'s
    counterpart of `ThreadedEinsumDense._matmul`."""
    return (product or threaded_matmul)(x, kernel)


class _ThreadedDenseMethods:
    """What the two dense layers share: bias and activation, our exact int8
    product, and Keras' quantization."""

    def _finish(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def _int8_product(self, matmul, inputs, quantize):
        """`matmul` of the quantized inputs (`quantize(inputs)` gives them
        and their scale) and the int8 kernel, exact, de-scaled as Keras
        does, then bias and activation. On PyTorch the operands are
        multiplied as float32 (the products are exact); on JAX by
        `int8_matmul`, differentiated like Keras' call (the input gradient
        goes through the de-quantized kernel)."""
        jax = keras.config.backend() == "jax"

        def exact(inputs, kernel, kernel_scale):
            quantized, inputs_scale = quantize(inputs)
            if jax:
                x = matmul(quantized, kernel, product=int8_matmul)
            else:
                x = matmul(
                    ops.cast(quantized, "float32"), ops.cast(kernel, "float32")
                )
            return ops.divide(
                ops.cast(x, self.compute_dtype),
                ops.multiply(inputs_scale, kernel_scale),
            )

        def dequantized(inputs, kernel, kernel_scale):
            kernel = self._dequantize(kernel, kernel_scale)
            return matmul(inputs, kernel, product=ops.matmul)

        if jax:
            exact = with_input_gradient_of(exact, dequantized)
        kernel, scale = (
            ops.convert_to_tensor(w) for w in (self._kernel, self.kernel_scale)
        )
        return self._finish(exact(inputs, kernel, scale))

    def _int8_is_ours(self, inputs):
        """Whether our exact int8 product replaces Keras': no LoRA, Keras'
        input quantizer present (older Keras versions take Keras' path),
        on CPU (where it was measured), and on PyTorch outside autograd
        (generation)."""
        if getattr(self, "inputs_quantizer", None) is None or self.lora_enabled:
            return False
        return int8_product_is_ours(inputs)

    def quantize(self, mode=None, type_check=True, **kwargs):
        # Keras refuses subclasses by default; the weights and quantizers
        # are Keras' own, so its quantization applies unchanged.
        super().quantize(mode, type_check=False, **kwargs)


class ThreadedEinsumDense(_ThreadedDenseMethods, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose float call uses `threaded_matmul`
    (on JAX CPU: one `ops.matmul` of the flattened operands).

    Applies to equations that contract the input's trailing axes with the
    kernel's leading axes (`"btd,dnh->btnh"`, `"btnh,nhd->btd"`); any
    other equation is Keras' own. When int8-quantized, on PyTorch CPU
    outside autograd and on JAX CPU, the int8 inputs and kernel are
    multiplied exactly without a whole-kernel copy (see the module
    docstring); every other quantized call is Keras' own.

    Example:

    >>> layer = ThreadedEinsumDense("btd,df->btf", (None, 6))
    >>> tuple(layer(keras.ops.ones((2, 1, 8))).shape)
    (2, 1, 6)
    """

    def __init__(self, equation, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._matmul_axes = _split_einsum(equation)

    def call(self, inputs, training=None):
        if self._matmul_axes is None or not _flattens(inputs):
            return super().call(inputs, training=training)
        return self._finish(self._matmul(inputs, self.kernel))

    def _int8_call(self, inputs, training=None):
        if not (
            self._int8_is_ours(inputs)
            and self._matmul_axes is not None
            and hasattr(self, "_adjust_scale_for_quant")
            and hasattr(self, "_adjust_scale_for_dequant")
        ):
            return super()._int8_call(inputs, training=training)

        def quantize(inputs):
            quantized, scale = self.inputs_quantizer(
                inputs, axis=self.quantization_axis
            )
            return quantized, self._adjust_scale_for_quant(scale, "input")

        return self._int8_product(self._matmul, inputs, quantize)

    def _dequantize(self, kernel, kernel_scale):
        scale = self._adjust_scale_for_dequant(kernel_scale)
        return ops.divide(ops.cast(kernel, self.compute_dtype), scale)

    def _matmul(self, inputs, kernel, product=None):
        """`einsum(equation, inputs, kernel)` as one `product` (by default
        `threaded_matmul`) of the flattened operands."""
        product = product or threaded_matmul
        batch, contracted, _ = self._matmul_axes
        kept_shape = tuple(kernel.shape[len(contracted) :])
        leading = tuple(ops.shape(inputs)[: len(batch)])
        x = _reshape(inputs, (*leading, -1))
        kernel = _reshape(kernel, (-1, math.prod(kept_shape)))
        return _reshape(product(x, kernel), (*leading, *kept_shape))


class ThreadedDense(_ThreadedDenseMethods, keras.layers.Dense):
    """`keras.layers.Dense` whose float call uses `threaded_matmul` and
    whose int8 product is ours where `ThreadedEinsumDense`'s is.

    Example:

    >>> layer = ThreadedDense(6)
    >>> tuple(layer(keras.ops.ones((2, 1, 8))).shape)
    (2, 1, 6)
    """

    def call(self, inputs, training=None):
        if keras.config.backend() not in THREADED:
            return super().call(inputs, training=training)
        return self._finish(threaded_matmul(inputs, self.kernel))

    def _int8_call(self, inputs, training=None):
        if not self._int8_is_ours(inputs):
            return super()._int8_call(inputs, training=training)

        def quantize(inputs):
            return self.inputs_quantizer(inputs, axis=-1)

        return self._int8_product(_product, inputs, quantize)

    def _dequantize(self, kernel, kernel_scale):
        return ops.divide(ops.cast(kernel, self.compute_dtype), kernel_scale)
