"""A few rows times an output-first kernel on XLA:CPU: a fused loop that
equals the `dot`, with the `dot`'s gradients, taken where it is faster."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import REPO
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
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25}


@pytest.mark.parametrize(
    "rows, dtype, expected",
    [
        (1, "float32", False),
        (2, "float32", True),
        (xla_few_rows.MAX_ROWS, "float32", True),
        (xla_few_rows.MAX_ROWS + 1, "float32", False),
        (None, "float32", False),
        (1, "bfloat16", True),
        (8, "float16", False),
        (xla_few_rows.MAX_ROWS + 1, "bfloat16", False),
        (8, "float64", False),
        (8, "int32", False),
    ],
)
def test_which_products_take_the_loop(rows, dtype, expected, monkeypatch):
    monkeypatch.setattr(xla_few_rows, "fuses", lambda dtype: True)
    assert xla_few_rows.applies(rows, dtype) is expected


@jax_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
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
def test_derivatives_are_the_dots():
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
    # Forward mode, and a gradient of the rows alone (the table's
    # derivative is a symbolic zero: no product for it).
    _, tangent = jax.jvp(
        lambda x: xla_few_rows.few_rows_product(x, table), (x,), (x,)
    )
    np.testing.assert_allclose(
        np.asarray(tangent), np.asarray(x @ table.T), rtol=1e-4, atol=1e-4
    )
    rows_only = jax.jit(jax.grad(loss(xla_few_rows.few_rows_product)))
    np.testing.assert_allclose(
        np.asarray(rows_only(x, table)),
        np.asarray(dot(x, table)[0]),
        rtol=1e-4,
        atol=1e-4,
    )
    assert compiled_text(rows_only, x, table).count(" dot(") == 1


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
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_products_of_the_same_rows_write_no_broadcast(dtype):
    """Gate and up (or query, key and value) multiply the same rows: XLA
    merged their broadcasts into one `(N, rows, K)` array it wrote out
    (989 ms for the FFW at 8 rows) until the loop's barrier kept them
    apart."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(RNG.normal(size=(8, 64)), dtype)
    gate, up = (jnp.asarray(RNG.normal(size=(48, 64)), dtype) for _ in "gu")

    def gated(x, gate, up):
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True))
        products = (xla_few_rows.few_rows_product(x, k) for k in (gate, up))
        return jax.nn.gelu(next(products)) * next(products)

    entry = compiled_text(gated, x, gate, up).split("\nENTRY")[1]
    assert "[48,8,64]" not in entry
    if dtype != "float32":
        return  # the values are checked in float32
    x, gate, up = (np.asarray(a) for a in (x, gate, up))
    normed = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True))
    expected = jax.nn.gelu(normed @ gate.T) * (normed @ up.T)
    np.testing.assert_allclose(
        np.asarray(gated(x, gate, up)), expected, atol=1e-4, rtol=1e-4
    )


def run_jax(code, **environment):
    """What `code` prints, run by a fresh JAX process."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": REPO}
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return result.stdout.split()


@jax_only
def test_the_loop_is_taken_only_where_xla_fuses_it():
    """This jaxlib fuses the loop in both dtypes; with XLA's YNNPACK
    fusion off it would write the whole product out, so the `dot` stays."""
    assert xla_few_rows.fuses("float32") and xla_few_rows.fuses("bfloat16")
    code = (
        "from keras_paligemma.layers import xla_few_rows as f\n"
        "print(f.applies(8, 'float32'), f.applies(1, 'bfloat16'))"
    )
    unfused = run_jax(code, XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=")
    assert unfused == ["False", "False"]


@jax_only
def test_an_eager_call_does_not_build_the_product():
    """Called outside `jax.jit` (an eager `generate`, a direct layer call)
    the loop is still one compiled program: the `(20000, 8, 1024)` float32
    product (655 MB) is never held in memory."""
    code = """
import resource
import jax.numpy as jnp
from keras_paligemma.layers.xla_few_rows import few_rows_product
table = jnp.ones((20000, 1024), "float32")
x = jnp.ones((8, 1024), "float32")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
few_rows_product(x, table).block_until_ready()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""
    (growth_mb,) = run_jax(code)
    assert int(growth_mb) < 200


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


@jax_only
def test_a_layer_compiles_to_the_loop_with_keras_gradients():
    """8 rows through an output-first layer, jitted as `fit` runs it: no
    `dot` forward, and the kernel's and the rows' gradients equal those
    of Keras' `EinsumDense`."""
    import jax

    x = RNG.normal(size=(8, 1, 32)).astype("float32")
    ours = ThreadedEinsumDense("btd,nhd->btnh", (None, 2, 8))
    keras_layer = keras.layers.EinsumDense("btd,nhd->btnh", (None, 2, 8))
    ours.build(x.shape)
    keras_layer.build(x.shape)
    keras_layer.kernel.assign(ours.kernel)
    kernel = ours.kernel.value

    def loss(layer):
        def value(kernel, x):
            out, _ = layer.stateless_call([kernel], [], x)
            return jax.numpy.sum(jax.numpy.sin(out))

        return value

    forward = jax.jit(lambda kernel, x: ours.stateless_call([kernel], [], x)[0])
    assert " dot(" not in compiled_text(forward, kernel, x)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(kernel, x)
    expected = jax.grad(loss(keras_layer), argnums=(0, 1))(kernel, x)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
