"""A few rows times an output-first kernel on XLA:CPU: a fused loop that
equals the `dot`, with the `dot`'s gradients, taken where it is faster."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers import xla_few_rows
from keras_paligemma.layers.reversible_embedding import ReversibleEmbedding
from keras_paligemma.layers.threaded_dense import ThreadedEinsumDense
from keras_paligemma.layers.threaded_matmul import dense_product

BACKEND = keras.config.backend()
jax_only = pytest.mark.skipif(
    BACKEND != "jax",
    reason="XLA:CPU's fused loop is JAX's; PyTorch and TensorFlow multiply "
    "few rows with their own products (test_threaded_matmul.py)",
)
RNG = np.random.default_rng(0)
# Float32 sums of 96 products of normal values, in another order.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.02}


@pytest.mark.parametrize(
    "rows, dtype, expected",
    [
        (1, "float32", False),
        (2, "float32", True),
        (xla_few_rows.MAX_ROWS, "float32", True),
        (xla_few_rows.MAX_ROWS + 1, "float32", False),
        (None, "float32", False),
        (1, "bfloat16", True),
        (1, "float16", True),
        (xla_few_rows.MAX_ROWS + 1, "bfloat16", False),
        (8, "float64", False),
        (8, "int32", False),
    ],
)
def test_which_products_take_the_loop(rows, dtype, expected, monkeypatch):
    measured = xla_few_rows.MIN_JAXLIB
    monkeypatch.setattr(xla_few_rows, "jaxlib_version", lambda: measured)
    assert xla_few_rows.applies(rows, dtype) is expected


@jax_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rows", [1, 2, 8, xla_few_rows.MAX_ROWS])
def test_loop_equals_the_dot(rows, dtype):
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(rows, 96)), dtype)
    table = jnp.asarray(RNG.normal(size=(40, 96)), dtype)
    out = xla_few_rows.few_rows_product(x, table)
    expected = np.asarray(x, "float64") @ np.asarray(table, "float64").T
    assert out.dtype == jnp.dtype(dtype)
    assert out.shape == (rows, 40)
    np.testing.assert_allclose(
        np.asarray(out, "float64"), expected, atol=TOLERANCE[dtype], rtol=0.01
    )


@jax_only
def test_mixed_operands_give_the_promoted_dtype():
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(4, 16)), "bfloat16")
    table = jnp.asarray(RNG.normal(size=(8, 16)), "float32")
    out = xla_few_rows.few_rows_product(x, table)
    assert out.dtype == jnp.float32
    expected = np.asarray(x, "float32") @ np.asarray(table).T
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)


@jax_only
def test_gradients_are_the_dots():
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(4, 32)), "float32")
    table = jnp.asarray(RNG.normal(size=(24, 32)), "float32")
    weights = jnp.asarray(RNG.normal(size=(4, 24)), "float32")

    def loss(product):
        return lambda x, table: jnp.sum(weights * product(x, table) ** 2)

    ours = jax.grad(loss(xla_few_rows.few_rows_product), argnums=(0, 1))
    dot = jax.grad(loss(lambda x, table: x @ table.T), argnums=(0, 1))
    for got, expected in zip(ours(x, table), dot(x, table)):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4
        )


def compiled_text(function, *args):
    import jax

    return jax.jit(function).lower(*args).compile().as_text()


@jax_only
@pytest.mark.parametrize(
    "rows, dtype, loop",
    [
        (1, "float32", False),
        (8, "float32", True),
        (1, "bfloat16", True),
        (xla_few_rows.MAX_ROWS + 1, "float32", False),
    ],
)
def test_dense_product_compiles_to_the_loop_or_a_dot(rows, dtype, loop):
    """What XLA:CPU runs: no `dot` for the loop's row counts."""
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(rows, 1, 64)), dtype)
    kernel = jnp.asarray(RNG.normal(size=(48, 64)), dtype)
    product = lambda x, kernel: dense_product(x, kernel, transposed=True)
    assert (" dot(" not in compiled_text(product, x, kernel)) is loop
    out = product(x, kernel)
    x32, kernel32 = np.asarray(x, "float32"), np.asarray(kernel, "float32")
    expected = np.einsum("rtk,nk->rtn", x32, kernel32)
    np.testing.assert_allclose(
        np.asarray(out, "float32"), expected, atol=TOLERANCE[dtype], rtol=0.01
    )


@jax_only
def test_two_products_of_the_same_rows_write_no_broadcast():
    """Gate and up (or query, key and value) multiply the same rows: XLA
    merged their broadcasts into one `(N, rows, K)` array it wrote out
    (989 ms for the FFW at 8 rows) until the loop's barrier kept them
    apart."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(8, 64)), "float32")
    gate, up = (jnp.asarray(RNG.normal(size=(48, 64)), "float32") for _ in "gu")

    def gated(x, gate, up):
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True))
        products = (xla_few_rows.few_rows_product(x, k) for k in (gate, up))
        return jax.nn.gelu(next(products)) * next(products)

    entry = compiled_text(gated, x, gate, up).split("\nENTRY")[1]
    assert "[48,8,64]" not in entry
    x, gate, up = (np.asarray(a) for a in (x, gate, up))
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True))
    expected = jax.nn.gelu(normed @ gate.T) * (normed @ up.T)
    np.testing.assert_allclose(
        np.asarray(gated(x, gate, up)), expected, atol=1e-4, rtol=1e-4
    )


def test_older_jaxlibs_keep_the_dot(monkeypatch):
    monkeypatch.setattr(xla_few_rows, "jaxlib_version", lambda: (0, 9))
    assert not xla_few_rows.applies(8, "float32")
    assert not xla_few_rows.applies(1, "bfloat16")


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_output_first_layer_and_tied_table_equal_keras(rows):
    """On every backend, a few rows through an output-first dense layer and
    the tied table's logits equal Keras' own layers' (on JAX through the
    loop, elsewhere through the backend's products)."""
    x = RNG.normal(size=(rows, 1, 32)).astype("float32")
    ours = ThreadedEinsumDense("btd,nhd->btnh", (None, 2, 8))
    keras_layer = keras.layers.EinsumDense("btd,nhd->btnh", (None, 2, 8))
    ours.build(x.shape)
    keras_layer.build(x.shape)
    keras_layer.kernel.assign(ours.kernel)
    np.testing.assert_allclose(
        ops.convert_to_numpy(ours(x)),
        ops.convert_to_numpy(keras_layer(x)),
        atol=1e-5,
    )
    table = ReversibleEmbedding(50, 32)
    keras_table = keras.layers.ReversibleEmbedding(50, 32)
    table.build((1,))
    keras_table.build((1,))
    keras_table.embeddings.assign(table.embeddings)
    np.testing.assert_allclose(
        ops.convert_to_numpy(table(x, reverse=True)),
        ops.convert_to_numpy(keras_table(x, reverse=True)),
        atol=1e-5,
    )
