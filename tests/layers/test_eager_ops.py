"""`eager_ops` computes what `keras.ops` computes, bit for bit, and calls
PyTorch's own op only for PyTorch tensors where that is the same."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers import eager_ops

RNG = np.random.default_rng(0)
TORCH = keras.config.backend() == "torch"


def tensor(dtype="float32", shape=(2, 3, 4)):
    return ops.cast(RNG.normal(size=shape).astype("float32"), dtype)


def same(ours, theirs):
    assert keras.backend.standardize_dtype(ours.dtype) == (
        keras.backend.standardize_dtype(theirs.dtype)
    )
    np.testing.assert_array_equal(
        ops.convert_to_numpy(ops.cast(ours, "float32")),
        ops.convert_to_numpy(ops.cast(theirs, "float32")),
    )


@pytest.fixture
def keras_ops_calls(monkeypatch):
    """Names of the `keras.ops` functions that `eager_ops` fell back on."""
    calls = []

    class Recording:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ops, name)

    monkeypatch.setattr(eager_ops, "ops", Recording())
    return calls


CASES = {
    "square": (lambda x: eager_ops.square(x), lambda x: ops.square(x)),
    "mean": (
        lambda x: eager_ops.mean(x, -1, keepdims=True),
        lambda x: ops.mean(x, axis=-1, keepdims=True),
    ),
    "rsqrt": (
        lambda x: eager_ops.rsqrt(ops.abs(x)),
        lambda x: ops.rsqrt(ops.abs(x)),
    ),
    "tanh": (lambda x: eager_ops.tanh(x), lambda x: ops.tanh(x)),
    "sin_cos": (
        lambda x: ops.stack(eager_ops.sin_cos(x)),
        lambda x: ops.stack([ops.sin(x), ops.cos(x)]),
    ),
    "gelu_tanh": (
        lambda x: eager_ops.gelu_tanh(x),
        lambda x: keras.activations.gelu(x, approximate=True),
    ),
    "softmax": (
        lambda x: eager_ops.softmax(x, axis=-1),
        lambda x: ops.softmax(x, axis=-1),
    ),
    "where_number": (
        lambda x: eager_ops.where(x > 0, x, -1e30),
        lambda x: ops.where(x > 0, x, -1e30),
    ),
    "where_tensor": (
        lambda x: eager_ops.where(x > 0, x, x * 2),
        lambda x: ops.where(x > 0, x, x * 2),
    ),
    "concatenate": (
        lambda x: eager_ops.concatenate([x, x * 2], axis=-1),
        lambda x: ops.concatenate([x, x * 2], axis=-1),
    ),
    "stack": (
        lambda x: eager_ops.stack([x, x * 2], axis=1),
        lambda x: ops.stack([x, x * 2], axis=1),
    ),
    "einsum": (
        lambda x: eager_ops.einsum("abc,adc->abd", x, x),
        lambda x: ops.einsum("abc,adc->abd", x, x),
    ),
    "reshape": (
        lambda x: eager_ops.reshape(x, (6, -1)),
        lambda x: ops.reshape(x, (6, -1)),
    ),
    "cast": (
        lambda x: eager_ops.cast(x, "float32"),
        lambda x: ops.cast(x, "float32"),
    ),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_same_as_keras_ops(name, dtype):
    ours, theirs = CASES[name]
    x = tensor(dtype)
    same(ours(x), theirs(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_pytorch_float32_tensors_skip_keras_ops(name, keras_ops_calls):
    ours, _ = CASES[name]
    x = tensor()
    keras_ops_calls.clear()
    ours(x)
    # `rsqrt`'s case takes `ops.abs` outside `eager_ops`.
    skipped = [call for call in keras_ops_calls if call != "abs"]
    assert (skipped == []) == TORCH, skipped


def test_16_bit_inputs_where_keras_differs_go_through_keras(keras_ops_calls):
    """Keras averages 16-bit tensors in float32, runs a float16 softmax in
    float32 on CPU, and makes a number beside a 16-bit tensor float32."""
    for dtype in ("bfloat16", "float16"):
        x = tensor(dtype)
        eager_ops.mean(x, -1)
        eager_ops.softmax(x)
        eager_ops.where(x > 0, x, -1e30)
    assert keras_ops_calls == ["mean", "softmax", "where"] * 2


def test_integer_and_mixed_inputs_go_through_keras(keras_ops_calls):
    integers = ops.arange(6, dtype="int32")
    same(eager_ops.mean(integers, 0), ops.mean(integers, axis=0))
    same(eager_ops.square(integers), ops.square(integers))
    halves, singles = tensor("float16"), tensor()
    same(
        eager_ops.concatenate([halves, singles], axis=0),
        ops.concatenate([halves, singles], axis=0),
    )
    bytes_ = ops.cast(ops.arange(6), "int8")  # Keras multiplies in int32
    same(
        eager_ops.einsum("a,a->", bytes_, bytes_),
        ops.einsum("a,a->", bytes_, bytes_),
    )
    assert keras_ops_calls[:4] == ["mean", "square", "concatenate", "einsum"]


def test_variables_are_read_and_symbolic_inputs_stay_symbolic():
    variable = keras.Variable(np.arange(6.0).reshape(2, 3), dtype="float32")
    same(eager_ops.reshape(variable, (3, 2)), ops.reshape(variable, (3, 2)))
    same(eager_ops.tensor(variable), ops.convert_to_tensor(variable))
    same(eager_ops.cast(variable, "bfloat16"), ops.cast(variable, "bfloat16"))
    symbolic = keras.KerasTensor((2, 3))
    assert isinstance(eager_ops.reshape(symbolic, (3, 2)), keras.KerasTensor)
    assert isinstance(eager_ops.cast(symbolic, "int32"), keras.KerasTensor)


def test_cast_keeps_a_tensor_that_has_the_dtype():
    x = tensor()
    assert eager_ops.cast(x, "float32") is x or not TORCH
    assert keras.backend.standardize_dtype(
        eager_ops.cast(x, "bfloat16").dtype
    ) == "bfloat16"
