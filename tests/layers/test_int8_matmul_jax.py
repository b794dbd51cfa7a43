"""JAX's int8 product: exact, bounded memory, and what the layers use."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_paligemma.layers import reversible_embedding as emb
from keras_paligemma.layers import threaded_dense as td
from keras_paligemma.layers import threaded_matmul as tm

pytestmark = pytest.mark.skipif(
    BACKEND != "jax",
    reason="XLA:CPU's int8 product on JAX; torch has its own path and "
    "TensorFlow uses Keras'",
)
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    """The path is for CPUs; these tests take it on any host."""
    monkeypatch.setattr(tm, "platform", lambda x=None: "cpu")


def int32_product(x, kernel):
    return x.astype("int64") @ kernel.astype("int64")


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("depth, columns", [(3000, 40), (40, 3000), (5, 7)])
@pytest.mark.parametrize("transposed", [False, True])
def test_int8_matmul_is_exact(rows, depth, columns, transposed):
    """Worst-case sums (beyond float32's 2**24) and random values, over
    several chunks whose last one overlaps the one before."""
    from keras_paligemma.layers.int8_matmul_jax import int8_matmul

    worst_x = np.full((rows, depth), -127, "int8")
    worst_kernel = np.full((depth, columns), -127, "int8")
    random_x = RNG.integers(-127, 128, (1, rows, depth)).astype("int8")
    random_kernel = RNG.integers(-127, 128, (depth, columns)).astype("int8")
    for x, kernel in ((worst_x, worst_kernel), (random_x, random_kernel)):
        operand = np.ascontiguousarray(kernel.T) if transposed else kernel
        out = int8_matmul(x, operand, transposed, chunk_elements=7 * 48)
        assert out.dtype == "int32" and out.shape == (*x.shape[:-1], columns)
        np.testing.assert_array_equal(np.asarray(out), int32_product(x, kernel))


@pytest.mark.parametrize("rows", [1, 8])
def test_decode_loop_converts_one_chunk_at_a_time(rows):
    """In a compiled loop over layers (generation's shape), Keras' int8
    product keeps int32 copies of the kernels; ours a chunk."""
    import jax
    import jax.numpy as jnp

    from keras_paligemma.layers.int8_matmul_jax import int8_matmul

    kernels = [RNG.integers(-127, 128, (2048, 2048)).astype("int8")] * 4
    table = RNG.integers(-127, 128, (16384, 2048)).astype("int8")
    copy_bytes = 4 * kernels[0].size  # one kernel as int32: 16 MiB

    def generation(product):
        def run(x, kernels, table):
            def step(_, x):
                for kernel in kernels:
                    x = (product(x, kernel, False) >> 16).astype("int8")
                return (product(x, table, True)[:, :2048] >> 16).astype("int8")

            return jax.lax.fori_loop(0, 3, step, x)

        return run

    def keras_product(x, kernel, transposed):
        kernel = kernel.T if transposed else kernel
        return jnp.matmul(x, kernel, preferred_element_type=jnp.int32)

    x = np.ones((rows, 2048), "int8")

    def temp_bytes(product):
        compiled = jax.jit(generation(product)).lower(x, kernels, table)
        return compiled.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(keras_product) > 4 * copy_bytes  # the table's copy
    assert temp_bytes(int8_matmul) < copy_bytes


def spy_on_int8_matmul(monkeypatch):
    calls = []
    original = td.int8_matmul

    def recording(*args, **kwargs):
        calls.append(kwargs.get("transposed", args[2] if len(args) > 2 else False))
        return original(*args, **kwargs)

    monkeypatch.setattr(td, "int8_matmul", recording)
    monkeypatch.setattr(emb, "int8_matmul", recording)
    return calls


def test_one_row_at_the_default_chunk_size_and_bad_dtypes():
    from keras_paligemma.layers.int8_matmul_jax import int8_matmul

    x = np.full((1, 4096), 127, "int8")
    kernel = RNG.integers(-127, 128, (4096, 300)).astype("int8")
    kernel[:, 0] = 127  # a sum of 4096 products of 127 * 127
    for operand, transposed in ((kernel, False), (kernel.T.copy(), True)):
        out = np.asarray(int8_matmul(x, operand, transposed))
        np.testing.assert_array_equal(out, int32_product(x, kernel))
    with pytest.raises(TypeError, match="int8 operands"):
        int8_matmul(x.astype("float32"), kernel)


INPUT_FIRST, OUTPUT_FIRST = "btd,dnh->btnh", "btd,nhd->btnh"
"""Keras' kernel layout, and the decoder's (`kernel_layout.py`)."""


def quantized_layers(rows, equation=INPUT_FIRST):
    x = RNG.normal(size=(1, rows, 64)).astype("float32")
    dense = td.ThreadedDense(48)
    einsum = td.ThreadedEinsumDense(equation, (None, 3, 16))
    for layer in (dense, einsum):
        layer.build(x.shape)
        layer.quantize("int8")
    return x, dense, einsum


@pytest.mark.parametrize("equation", [INPUT_FIRST, OUTPUT_FIRST])
@pytest.mark.parametrize("rows", [1, 5])
def test_quantized_layers_use_it_and_equal_keras_bit_for_bit(
    rows, equation, monkeypatch
):
    calls = spy_on_int8_matmul(monkeypatch)
    x, dense, einsum = quantized_layers(rows, equation)
    embedding = emb.ReversibleEmbedding(300, 64, logit_soft_cap=30.0)
    embedding.build()
    embedding.quantize("int8")

    pairs = [
        (dense(x), keras.layers.Dense._int8_call(dense, x)),
        (einsum(x), keras.layers.EinsumDense._int8_call(einsum, x)),
        (
            embedding(x, reverse=True),
            keras.layers.ReversibleEmbedding._int8_call(embedding, x, True),
        ),
    ]
    assert calls == [False, equation == OUTPUT_FIRST, True]
    for ours, theirs in pairs:
        np.testing.assert_array_equal(ops.convert_to_numpy(ours), theirs)


@pytest.mark.parametrize("equation", [INPUT_FIRST, OUTPUT_FIRST])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("jit", [False, True])
def test_input_gradient_equals_keras(rows, jit, equation, monkeypatch):
    """Keras' int8 call passes the gradient straight through the input
    quantizer, with the de-quantized kernel; ours, used in any call, too."""
    import jax

    calls = spy_on_int8_matmul(monkeypatch)
    x, dense, einsum = quantized_layers(rows, equation)
    compile = jax.jit if jit else (lambda f: f)
    for layer, keras_class in (
        (dense, keras.layers.Dense),
        (einsum, keras.layers.EinsumDense),
    ):
        ours = compile(jax.grad(lambda x: ops.sum(ops.sin(layer(x)))))(x)
        theirs = jax.grad(
            lambda x: ops.sum(ops.sin(keras_class._int8_call(layer, x)))
        )(x)
        assert np.abs(theirs).sum() > 1  # not just the scale's path
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["gpu", "tpu"])
def test_accelerators_keep_keras_int8_product(name, monkeypatch):
    """Measured on CPU only: elsewhere Keras' product, unchanged."""
    monkeypatch.setattr(tm, "platform", lambda x=None: name)
    calls = spy_on_int8_matmul(monkeypatch)
    x, dense, einsum = quantized_layers(1)
    embedding = emb.ReversibleEmbedding(300, 64)
    embedding.build()
    embedding.quantize("int8")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(dense(x)), keras.layers.Dense._int8_call(dense, x)
    )
    einsum(x)
    embedding(x, reverse=True)
    assert calls == []


def test_weight_only_tied_embedding_keeps_keras_product(monkeypatch):
    """Without Keras' input quantizer the inputs stay float: Keras' call."""
    calls = spy_on_int8_matmul(monkeypatch)
    embedding = emb.ReversibleEmbedding(300, 64)
    embedding.build()
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    embedding.quantize("int8", config=config)
    x = RNG.normal(size=(1, 1, 64)).astype("float32")
    ours = embedding(x, reverse=True)
    theirs = keras.layers.ReversibleEmbedding._int8_call(embedding, x, True)
    assert calls == []
    np.testing.assert_array_equal(ops.convert_to_numpy(ours), theirs)
