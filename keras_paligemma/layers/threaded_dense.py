"""Dense layers whose float products read the weights fast on CPU.

`ThreadedEinsumDense` and `ThreadedDense` are drop-in subclasses of the
Keras layers whose float call multiplies with `threaded_matmul` (the
tied embedding is `reversible_embedding.ReversibleEmbedding`).
int8-quantized, they replace Keras' int8 x int8 product with an exact one
that never copies a whole kernel: on PyTorch CPU (outside autograd) as
float32 products, since Keras' int32 product is slow there; on JAX CPU
with `int8_matmul_jax.int8_matmul` (differentiated as Keras' call), since
XLA:CPU makes an int32 copy of every kernel for a one-row product. Other
quantized calls are Keras' own.

On JAX CPU too, `ThreadedEinsumDense` computes its float einsum as one
product of the operands flattened to 2-D. Given Keras' einsum for the
attention output projection (`"btnh,nhd->btd"`, as it was stored before
`kernel_layout.py`) after the attention,
XLA:CPU chose to copy the kernel into the head order of the attention
output on every call, a decode step included (19 MB per layer for
PaliGemma 2 3B); with the heads flattened the kernel is read in place.
Against Keras' einsum, in one process with the same weights,
interleaved, same tokens, batch 1: decode of the 4-layer benchmark config
took 115-125 against 127-132 ms/token in five pairs; with 12 decoder
layers 221-230 against 225-247 ms/token and time to first token
2683-2708 against 2785-3064 ms in four pairs. At batch 8 (compute-bound)
the difference was within noise.

Equations whose kernel has its output axes first (the decoder's,
`kernel_layout.py`: `"btd,fd->btf"`) multiply by the transposed 2-D
kernel, read in place (`threaded_matmul(..., transposed=True)`).

Example:

>>> layer = ThreadedEinsumDense("btd,fd->btf", (None, 6))
>>> tuple(layer(keras.ops.ones((2, 1, 8))).shape)
(2, 1, 6)
>>> tuple(layer.kernel.shape)
(6, 8)
"""

import math

import keras
from keras import ops

from keras_paligemma.layers import eager_ops
from keras_paligemma.layers.device import platform
from keras_paligemma.layers.int8_matmul_jax import int8_matmul
from keras_paligemma.layers.int8_matmul_jax import with_input_gradient_of
from keras_paligemma.layers.kernel_layout import from_input_first
from keras_paligemma.layers.threaded_matmul import THREADED
from keras_paligemma.layers.threaded_matmul import dense_product
from keras_paligemma.layers.threaded_matmul import int8_product_is_ours
from keras_paligemma.layers.threaded_matmul import threaded_matmul


def _split_einsum(equation):
    """`(batch_letters, contracted_letters, output_letters, output_first)`
    of an einsum `"<batch><contracted>,<contracted><out>-><batch><out>"`
    (`output_first` False) or `"<batch><contracted>,<out><contracted>->
    <batch><out>"` (True), else None."""
    inputs, output = equation.replace(" ", "").split("->")
    left, kernel = inputs.split(",")
    contracted = "".join(c for c in kernel if c not in output)
    batch = left[: len(left) - len(contracted)]
    kept = output[len(batch) :]
    if (
        not contracted
        or "." in equation
        or left != batch + contracted
        or output != batch + kept
        or kernel not in (contracted + kept, kept + contracted)
    ):
        return None
    return batch, contracted, kept, kernel == kept + contracted


def _flattens(inputs):
    """Whether `ThreadedEinsumDense`'s float call is one product of the
    flattened operands: on PyTorch and TensorFlow (`threaded_matmul`) and
    on JAX CPU (one 2-D dot, see the module docstring)."""
    backend = keras.config.backend()
    if backend == "jax":
        return platform(inputs) == "cpu"
    return backend in THREADED


def _product(x, kernel, product=None):
    """`(product or threaded_matmul)(x, kernel, transposed=False)`:
    `ThreadedDense`'s counterpart of `ThreadedEinsumDense._matmul`."""
    return (product or threaded_matmul)(x, kernel, transposed=False)


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
            return matmul(inputs, kernel, product=dense_product)

        if jax:
            exact = with_input_gradient_of(exact, dequantized)
        kernel, scale = (
            ops.convert_to_tensor(w) for w in (self._kernel, self.kernel_scale)
        )
        return self._finish(exact(inputs, kernel, scale))

    def _int8_is_ours(self, inputs):
        """Whether our exact int8 product replaces Keras': no LoRA (an
        output-first kernel's LoRA term is added after it), Keras'
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
    (on JAX CPU too) on the flattened operands.

    Applies to equations that contract the input's trailing axes with the
    kernel's leading axes (`"btd,dnh->btnh"`) or its trailing axes, the
    output axes first (`"btd,nhd->btnh"`, the decoder's); any other
    equation is Keras' own. When int8-quantized, on PyTorch CPU outside
    autograd and on JAX CPU, the int8 inputs and kernel are multiplied
    exactly without a whole-kernel copy (see the module docstring); every
    other quantized call is Keras' own. Keras' int4, GPTQ and AWQ
    quantization assume the contracted axes first, so an output-first
    kernel is transposed to that layout before them
    (`_use_input_first_kernel`).

    Example:

    >>> layer = ThreadedEinsumDense("btd,df->btf", (None, 6))
    >>> tuple(layer(keras.ops.ones((2, 1, 8))).shape)
    (2, 1, 6)
    """

    def __init__(self, equation, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        self._matmul_axes = _split_einsum(equation)
        self.input_first_files = False

    def load_own_variables(self, store):
        """Keras' loading; with `input_first_files` (set by
        `kernel_layout.read_input_first_files`), the stored kernel is
        transposed from the layout of earlier presets first, this once
        (unless the file's kernel already has the stored shape)."""
        if not self.input_first_files:
            return super().load_own_variables(store)
        self.input_first_files = False
        stored = {key: store[key] for key in store.keys()}
        kernel = from_input_first(self._kernel.path, stored["0"][()])
        if tuple(kernel.shape) == tuple(self._kernel.shape):
            # A kernel that already has the stored shape (a current file
            # after `load_weights=False`) is loaded as it is.
            stored["0"] = kernel
        return super().load_own_variables(stored)

    def quantize(self, mode=None, type_check=True, **kwargs):
        if mode in ("int4", "gptq", "awq") and self._output_first():
            self._use_input_first_kernel()
        super().quantize(mode, type_check=type_check, **kwargs)

    def _output_first(self):
        return self._matmul_axes is not None and self._matmul_axes[3]

    def _use_input_first_kernel(self):
        """Transpose an output-first float kernel to the contracted axes
        first and rewrite the equation to match: Keras' int4 quantization
        flattens the kernel to `(contracted, kept)` (with the output axes
        first it scaled mixed groups of weights) and adds LoRA as
        `einsum(equation, x, A) @ B`; GPTQ and AWQ read the axes by
        position. int4 models are never saved as presets (`refuse_int4`)."""
        if self.lora_enabled:
            raise ValueError(
                f"`{self.path}`: quantize to int4, GPTQ or AWQ before "
                "`enable_lora`, not after."
            )
        inputs, output = self.equation.split("->")
        left, kernel_letters = inputs.split(",")
        _, contracted, kept, _ = self._matmul_axes
        order = [kernel_letters.index(c) for c in contracted + kept]
        value = ops.transpose(self._kernel, order)
        trainable = self._kernel.trainable
        # Keras' quantize wrapper unlocks the tracker and locks it after.
        del self._kernel
        self._kernel = self.add_weight(
            name="kernel",
            shape=tuple(value.shape),
            initializer="zeros",
            dtype=self.variable_dtype,
            trainable=trainable,
        )
        self._kernel.assign(value)
        self.equation = f"{left},{contracted}{kept}->{output}"
        self._matmul_axes = _split_einsum(self.equation)

    def call(self, inputs, training=None):
        if self._matmul_axes is None or not _flattens(inputs):
            return super().call(inputs, training=training)
        return self._finish(self._matmul(inputs, self.kernel))

    def _int8_call(self, inputs, training=None):
        if self.lora_enabled and self._output_first():
            return self._int8_call_with_output_first_lora(inputs, training)
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

    def _int8_call_with_output_first_lora(self, inputs, training):
        """The int8 product plus the LoRA term of an output-first kernel.

        Keras' int8 call computes its LoRA term as
        `einsum(equation, inputs, lora_kernel_a) @ lora_kernel_b`, which
        takes the kernel's last axis for an output axis; here it is
        contracted, so `inputs` meet `lora_kernel_b` first.
        """
        if self.activation not in (None, keras.activations.linear):
            raise NotImplementedError(
                "int8 LoRA of an output-first kernel adds the LoRA term "
                "after the layer's product; this layer has an activation."
            )
        self.lora_enabled = False
        try:
            x = self._int8_call(inputs, training=training)
        finally:
            self.lora_enabled = True
        inputs_letters, kernel_letters = self.equation.split("->")[0].split(",")
        output_letters = self.equation.split("->")[1]
        last = kernel_letters[-1]
        rank = next(c for c in "rzyxwvu" if c not in self.equation)
        reduced = inputs_letters.replace(last, rank)
        lora = ops.einsum(
            f"{inputs_letters},{rank}{last}->{reduced}", inputs, self.lora_kernel_b
        )
        lora = ops.einsum(
            f"{reduced},{kernel_letters.replace(last, rank)}->{output_letters}",
            lora,
            self.lora_kernel_a,
        )
        x = ops.add(x, (self.lora_alpha / self.lora_rank) * lora)
        return ops.cast(x, self.compute_dtype)

    def _dequantize(self, kernel, kernel_scale):
        scale = self._adjust_scale_for_dequant(kernel_scale)
        return ops.divide(ops.cast(kernel, self.compute_dtype), scale)

    def _matmul(self, inputs, kernel, product=None):
        """`einsum(equation, inputs, kernel)` as one `product` (by default
        `threaded_matmul`) of the flattened operands, the kernel a 2-D
        `(K, N)`, or `(N, K)` with `transposed=True` for output-first
        kernels."""
        product = product or threaded_matmul
        batch, contracted, kept, output_first = self._matmul_axes
        if output_first:
            kept_shape = tuple(kernel.shape[: len(kept)])
            kernel = eager_ops.reshape(kernel, (math.prod(kept_shape), -1))
        else:
            kept_shape = tuple(kernel.shape[len(contracted) :])
            kernel = eager_ops.reshape(kernel, (-1, math.prod(kept_shape)))
        leading = tuple(ops.shape(inputs)[: len(batch)])
        x = eager_ops.reshape(inputs, (*leading, -1))
        out = product(x, kernel, transposed=output_first)
        return eager_ops.reshape(out, (*leading, *kept_shape))


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
