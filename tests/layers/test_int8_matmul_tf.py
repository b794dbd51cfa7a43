"""TensorFlow's int8 tied-table product: exact, and without a table copy."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import BACKEND
from conftest import REPO
from keras_paligemma.layers import reversible_embedding as emb

pytestmark = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="TensorFlow's product; JAX and PyTorch have their own",
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(1, 3000), (3, 3000), (2, 1, 1100)])
@pytest.mark.parametrize("compile", [None, "graph", "xla"])
def test_exact_past_float32_integers(shape, compile):
    """Odd sums past 2**24 (about -127 * 127 * 1100), over overlapping
    chunks (10 rows in chunks of 3), eager, in a graph and under XLA."""
    import tensorflow as tf

    from keras_paligemma.layers.int8_matmul_tf import int8_table_matmul

    x = RNG.integers(-127, 128, size=shape).astype("int8")
    x.reshape(-1, shape[-1])[0] = -127
    table = RNG.integers(-127, 128, size=(10, shape[-1])).astype("int8")
    table[0] = 127
    table[0, 0] = 126  # an odd sum: float32 pieces summed as floats round

    def product(x, table):
        return int8_table_matmul(x, table, chunk_elements=3 * shape[-1])

    if compile:
        product = tf.function(product, jit_compile=compile == "xla")
    out = product(tf.constant(x), tf.constant(table))
    expected = x.astype("int64") @ table.T.astype("int64")
    assert out.dtype == tf.int32 and tuple(out.shape) == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)
    assert expected.min() < -(2**24)


def test_refuses_other_dtypes_and_depths():
    from keras_paligemma.layers.int8_matmul_tf import int8_table_matmul

    table = np.ones((4, 8), "int8")
    with pytest.raises(TypeError, match="int8 operands.*float32"):
        int8_table_matmul(np.ones((1, 8), "float32"), table)
    with pytest.raises(ValueError, match="`x` has 6 features.*8"):
        int8_table_matmul(np.ones((1, 6), "int8"), table)


MEASURE = """
import ctypes, gc, sys
import numpy as np
import tensorflow as tf
from keras_paligemma.layers.int8_matmul_tf import int8_table_matmul

def status(key):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key))
    return int(line.split()[1]) * 1024

def product(x, table):
    if sys.argv[1] == "ours":
        return int8_table_matmul(x, table, chunk_elements=2**20)
    return tf.matmul(x, tf.transpose(table), output_type=tf.int32)

rng = np.random.default_rng(0)
x = tf.constant(rng.integers(-127, 128, (1, 2048), dtype="int8"))
compiled = tf.function(product)
compiled(x, tf.Variable(np.ones((64, 2048), "int8"))).numpy()  # warm up
table = tf.Variable(rng.integers(-127, 128, (16384, 2048), dtype="int8"))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak restarts from the current RSS
before = status("VmRSS")
compiled(x, table).numpy()
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc"
)
def test_table_is_never_copied():
    """Keras' product transposes the table and casts it to int32 inside
    the kernel (5x its size); ours converts one 4 MiB chunk at a time.
    Each is measured in a fresh process: TensorFlow's oneDNN allocator
    keeps freed memory for reuse."""

    def peak_increase(which):
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, which],
            capture_output=True, text=True, check=True, cwd=REPO,
            env={**os.environ, "PYTHONPATH": REPO},
        )
        return int(result.stdout.split()[-1])

    table_bytes = 16384 * 2048
    assert peak_increase("keras") > 2 * table_bytes
    assert peak_increase("ours") < table_bytes / 2


def spy_on_table_product(monkeypatch):
    calls = []
    original = emb.int8_table_matmul

    def recording(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(emb, "int8_table_matmul", recording)
    return calls


def quantized_embedding(**quantize_kwargs):
    layer = emb.ReversibleEmbedding(300, 64, logit_soft_cap=30.0)
    layer.build()
    layer.quantize("int8", **quantize_kwargs)
    return layer


@pytest.mark.parametrize("rows", [1, 3])
def test_embedding_uses_it_and_equals_keras_bit_for_bit(rows, monkeypatch):
    calls = spy_on_table_product(monkeypatch)
    layer = quantized_embedding()
    x = RNG.normal(size=(2, rows, 64)).astype("float32")
    out = layer(x, reverse=True)
    expected = keras.layers.ReversibleEmbedding._int8_call(layer, x, True)
    assert calls == [(300, 64)]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_accelerators_and_weight_only_keep_keras_product(monkeypatch):
    from keras_paligemma.layers import threaded_matmul as tm

    calls = spy_on_table_product(monkeypatch)
    x = RNG.normal(size=(1, 1, 64)).astype("float32")
    config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    weight_only = quantized_embedding(config=config)
    weight_only(x, reverse=True)
    monkeypatch.setattr(tm, "platform", lambda x=None: "gpu")
    quantized_embedding()(x, reverse=True)
    assert calls == []
