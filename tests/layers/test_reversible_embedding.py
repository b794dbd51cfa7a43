"""The tied table's float product: on TensorFlow compiled by XLA for one
row or more than 64, TensorFlow's own for 2-64 (and decoder products on
a matrix of rows there), a plain dot on JAX."""

import keras
import numpy as np
import pytest

from conftest import BACKEND
from keras_paligemma.layers import reversible_embedding as emb
from keras_paligemma.layers import threaded_dense as td
from keras_paligemma.layers import threaded_matmul as tm

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="TensorFlow's graph paths"
)

RNG = np.random.default_rng(0)


def spy_on_xla_product(monkeypatch):
    calls = []
    original = emb.xla_table_matmul

    def recording(x, table):
        calls.append(tuple(table.shape))
        return original(x, table)

    monkeypatch.setattr(emb, "xla_table_matmul", recording)
    return calls


def embedding(dtype=None, layer_class=emb.ReversibleEmbedding):
    layer = layer_class(300, 64, logit_soft_cap=30.0, dtype=dtype)
    layer.build()
    layer.embeddings.assign(RNG.normal(size=(300, 64)).astype("float32"))
    return layer


def ours_and_keras(dtype=None):
    """Our embedding and Keras' with the same table."""
    layer = embedding(dtype)
    keras_layer = embedding(dtype, keras.layers.ReversibleEmbedding)
    keras_layer.embeddings.assign(layer.embeddings)
    return layer, keras_layer


@tensorflow_only
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_tied_table_product_is_compiled_and_equals_keras(dtype, monkeypatch):
    """In a graph with unknown batch and length (XLA's product is traced
    as one branch; 6 rows take the other when it runs)."""
    import tensorflow as tf

    calls = spy_on_xla_product(monkeypatch)
    layer, keras_layer = ours_and_keras(dtype)
    spec = tf.TensorSpec((None, None, 64), layer.compute_dtype)
    ours = tf.function(lambda x: layer(x, reverse=True), input_signature=[spec])
    theirs = tf.function(
        lambda x: keras_layer(x, reverse=True), input_signature=[spec]
    )
    x = tf.cast(RNG.normal(size=(2, 3, 64)).astype("float32"), layer.compute_dtype)
    out, expected = ours(x), theirs(x)
    assert calls == [(300, 64)]
    assert out.dtype == expected.dtype and tuple(out.shape) == (2, 3, 300)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(
        np.asarray(tf.cast(out, "float32")),
        np.asarray(tf.cast(expected, "float32")),
        atol=tolerance,
    )


def op_types(function, spec):
    graph = function.get_concrete_function(spec).graph
    return {op.type for op in graph.get_operations()}


BATCHED = {"BatchMatMulV2", "BatchMatMulV3"}


@tensorflow_only
@pytest.mark.parametrize(
    "dtype, rows, product",
    [
        ("float32", 1, "xla"),  # one decode row: XLA's dot
        ("float32", 2, "2-D"),  # oneDNN read the table 2x faster
        ("float32", 3, "2-D"),
        ("float32", 4, "batched"),  # the real table is a big kernel
        ("float32", 64, "batched"),
        ("float32", 65, "xla"),
        ("bfloat16", 8, "batched"),
        ("mixed_bfloat16", 8, "batched"),
    ],
)
def test_tied_table_product_for_known_rows(dtype, rows, product, monkeypatch):
    """A graph traced for a known row count (a decode step at a fixed
    batch size): one row, or more than `MAX_ROWS`, goes to XLA, 2-3 rows
    to TensorFlow's 2-D product, more to its batched one (for a table as
    big as the real one), never through a transposed copy of the table.
    Same logits as Keras'."""
    import tensorflow as tf

    monkeypatch.setattr(tm, "TENSORFLOW_BIG_KERNEL", 300 * 64)
    calls = spy_on_xla_product(monkeypatch)
    layer, keras_layer = ours_and_keras(dtype)
    shape = (rows, 1, 64)
    spec = tf.TensorSpec(shape, layer.compute_dtype)
    ours = tf.function(lambda x: layer(x, reverse=True))
    types = op_types(ours, spec)
    assert calls == ([(300, 64)] if product == "xla" else [])
    if product != "xla":
        assert "Transpose" not in types
        assert bool(types & BATCHED) == (product == "batched")
        assert ("MatMul" in types) == (product == "2-D")
    x = tf.cast(RNG.normal(size=shape).astype("float32"), layer.compute_dtype)
    out = ours(x)
    expected = keras_layer(x, reverse=True)
    assert out.dtype == expected.dtype and tuple(out.shape) == (rows, 1, 300)
    if dtype == "float32":
        tolerance = dict(atol=1e-5)
    else:  # A sum in another order may round a logit 1-2 steps off.
        tolerance = dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(
        np.asarray(tf.cast(out, "float32")),
        np.asarray(tf.cast(expected, "float32")),
        **tolerance,
    )


@tensorflow_only
def test_tied_table_product_for_rows_counted_at_run_time():
    """A serving signature's `None` batch: the graph holds both products
    and picks by the row count when it runs; Keras' logits for each."""
    import tensorflow as tf

    layer, keras_layer = ours_and_keras()
    ours = tf.function(lambda x: layer(x, reverse=True))
    spec = tf.TensorSpec((None, 1, 64), "float32")
    assert op_types(ours, spec) & {"If", "StatelessIf"}
    for rows in (1, 3, 8, 64, 65):
        x = RNG.normal(size=(rows, 1, 64)).astype("float32")
        np.testing.assert_allclose(
            np.asarray(ours.get_concrete_function(spec)(x)),
            np.asarray(keras_layer(x, reverse=True)),
            atol=1e-5,
        )


@tensorflow_only
@pytest.mark.parametrize("rows", [1, 8])
def test_tied_table_gradients_equal_keras(rows):
    """Gradients for the inputs and the tied table, for XLA's product (one
    row) and TensorFlow's (8 rows)."""
    import tensorflow as tf

    layer, keras_layer = ours_and_keras()
    x = tf.constant(RNG.normal(size=(rows, 1, 64)).astype("float32"))
    weights = RNG.normal(size=(rows, 1, 300)).astype("float32")

    def gradients(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x, reverse=True) * weights)
        return tape.gradient(loss, [x, model.embeddings.value])

    for ours, theirs in zip(gradients(layer), gradients(keras_layer)):
        assert ours is not None and theirs is not None
        np.testing.assert_allclose(
            np.asarray(ours), np.asarray(theirs), rtol=1e-4, atol=1e-4
        )


@tensorflow_only
def test_untied_and_accelerators_keep_tensorflow_product(monkeypatch):
    calls = spy_on_xla_product(monkeypatch)
    x = RNG.normal(size=(1, 1, 64)).astype("float32")
    untied = emb.ReversibleEmbedding(300, 64, tie_weights=False)
    untied.build()
    untied(x, reverse=True)
    monkeypatch.setattr(emb, "platform", lambda x=None: "gpu")
    embedding()(x, reverse=True)
    assert calls == []


@tensorflow_only
def test_decoder_products_are_not_batched_matmuls():
    """oneDNN's batched matmul read these kernels at about 0.6x the speed
    of the same product on a matrix of rows, for a decode step's few rows
    or an unknown count (many rows: `threaded_matmul`'s tests)."""
    import tensorflow as tf

    layer = td.ThreadedEinsumDense("btd,dnh->btnh", (None, 2, 8))
    output_first = td.ThreadedEinsumDense("btd,nhd->btnh", (None, 2, 8))
    dense = td.ThreadedDense(6)
    spec = tf.TensorSpec((None, None, 16), "float32")
    graph = tf.function(
        lambda x: (layer(x), output_first(x), dense(x)), input_signature=[spec]
    ).get_concrete_function().graph
    types = {op.type for op in graph.get_operations()}
    assert "MatMul" in types
    assert not any("BatchMatMul" in t for t in types)
    x = RNG.normal(size=(2, 3, 16)).astype("float32")
    for einsum in (layer, output_first):
        expected = np.einsum(einsum.equation, x, np.asarray(einsum.kernel))
        np.testing.assert_allclose(np.asarray(einsum(x)), expected, atol=1e-5)


def loop_fused_products(hlo_text):
    """The fusions in compiled HLO text that XLA emits as loops (`kLoop`)
    around a `dot`, instead of as matrix products."""
    import re

    bodies = {
        m.group(1): m.group(0)
        for m in re.finditer(r"^%(\S+) \(.*?\n}\n", hlo_text, re.S | re.M)
    }
    return [
        line.strip()
        for line in hlo_text.splitlines()
        if (m := re.search(r"fusion\(.*kind=kLoop, calls=%(\S+?),", line))
        and " dot(" in bodies.get(m.group(1), "")
    ]


@pytest.mark.skipif(BACKEND != "jax", reason="inspects XLA:CPU's compiled HLO")
@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_tied_table_product_after_the_final_norm_is_a_dot(dtype):
    """The final norm, then the logits of one row, compiled, as a decode
    step runs them: with Keras' `matmul(x, transpose(table))` XLA:CPU
    fused all three into one loop (2.4 GB of table read at ~0.8x the
    machine's rate); ours stays a plain dot (in bfloat16 `xla_few_rows`'
    loop, no dot at all), with Keras' logits."""
    import jax

    from keras_paligemma.layers.rms_norm import RMSNormalization

    norm = RMSNormalization(dtype=dtype)
    norm.build((1, 1, 64))
    norm.scale.assign(RNG.normal(size=(64,)).astype("float32"))

    def compiled(layer_class):
        layer = embedding(dtype, layer_class)

        def logits(weights, x):
            return layer.stateless_call(weights, [], norm(x), reverse=True)[0]

        weights = [v.value for v in layer.trainable_variables]
        return jax.jit(logits).lower(weights, x).compile(), weights

    x = RNG.normal(size=(1, 1, 64)).astype("float32")
    ours, weights = compiled(emb.ReversibleEmbedding)
    theirs, _ = compiled(keras.layers.ReversibleEmbedding)
    assert loop_fused_products(theirs.as_text())  # what this test guards
    assert not loop_fused_products(ours.as_text())
    np.testing.assert_allclose(
        np.asarray(ours(weights, x), "float32"),
        np.asarray(theirs(weights, x), "float32"),
        atol=1e-5 if dtype == "float32" else 0.2,
    )
