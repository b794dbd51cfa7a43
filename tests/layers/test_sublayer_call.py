"""A block's sublayers skip `Layer.__call__` only in eager PyTorch
inference, with the same results."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers import sublayer_call
from keras_paligemma.layers.decoder_block import DecoderBlock
from keras_paligemma.layers.sublayer_call import call_sublayer

RNG = np.random.default_rng(0)


def block(dtype="float32"):
    layer = DecoderBlock(
        hidden_dim=16,
        intermediate_dim=32,
        num_query_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        query_pre_attn_scalar=8,
        attention_logit_softcap=50.0,
        use_post_norms=True,
        dtype=dtype,
    )
    layer.build((1, 5, 16))
    for variable in layer.weights:
        variable.assign(RNG.normal(size=variable.shape) * 0.3)
    return layer


def inputs():
    x = ops.convert_to_tensor(RNG.normal(size=(1, 5, 16)).astype("float32"))
    mask = ops.convert_to_tensor(np.tril(np.ones((1, 5, 5), bool)))
    positions = ops.convert_to_tensor(np.arange(5)[None].astype("int32"))
    return x, mask, positions


@pytest.fixture
def keras_calls(monkeypatch):
    """Names of the layers called through `Layer.__call__`."""
    seen = []
    real_call = keras.layers.Layer.__call__

    def recording_call(self, *args, **kwargs):
        seen.append(self.name)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", recording_call)
    return seen


def no_grad():
    if keras.config.backend() != "torch":
        import contextlib

        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("quantized", [False, True])
def test_a_block_gives_the_same_outputs_and_skips_only_on_torch(
    dtype, quantized, keras_calls, monkeypatch
):
    layer = block(dtype)
    if quantized:
        attention = layer.attention
        for dense in (
            attention.query_dense,
            attention.key_dense,
            attention.value_dense,
            attention.output_dense,
            layer.gate_dense,
            layer.up_dense,
            layer.down_dense,
        ):
            dense.quantize("int8")
    x, mask, positions = inputs()

    def run():
        out = layer(x, mask, positions)
        return ops.convert_to_numpy(ops.cast(out, "float32"))

    with no_grad():
        with monkeypatch.context() as keras_only:
            keras_only.setattr(sublayer_call, "_calls_directly", lambda *_: False)
            through_keras = run()
        expected_calls = list(keras_calls)
        assert "query" in expected_calls and "pre_ffw_norm" in expected_calls
        keras_calls.clear()
        direct = run()
    np.testing.assert_array_equal(direct, through_keras)
    if keras.config.backend() == "torch":
        assert keras_calls == [layer.name]  # the block's own call only
    else:
        assert keras_calls == expected_calls


def test_autograd_goes_through_keras(keras_calls):
    layer = block()
    layer(*inputs())
    assert "query" in keras_calls and "pre_ffw_norm" in keras_calls


def test_a_sublayer_of_another_compute_dtype_goes_through_keras(
    keras_calls,
):
    parent = keras.layers.Dense(2)
    parent.build((1, 4))
    other_dtype = keras.layers.Dense(2, dtype="bfloat16")
    unbuilt = keras.layers.Dense(2)
    x = ops.ones((1, 4))
    with no_grad():
        out = call_sublayer(parent, other_dtype, x)
        call_sublayer(parent, unbuilt, x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras_calls == [other_dtype.name, unbuilt.name]


def decode_step_inputs():
    """A row at position 5, its mask over 6 cache slots, and a float32
    `(1, 2, 6, 1, 8)` cache as numpy (each step copies it)."""
    x, _, _ = inputs()
    mask = ops.convert_to_tensor(np.ones((1, 1, 6), bool))
    positions = ops.convert_to_tensor(np.array([[5]], "int32"))
    cache = np.asarray(RNG.normal(size=(1, 2, 6, 1, 8)), "float32")
    return x[:, :1], mask, positions, cache


def test_a_decode_step_with_a_cache_gives_the_same_outputs(monkeypatch):
    layer = block()
    row, mask, positions, cache = decode_step_inputs()

    def step():
        out, new_cache = layer(
            row,
            mask,
            positions,
            cache=ops.convert_to_tensor(cache.copy()),
            cache_update_index=5,
            output_index=0,
        )
        return ops.convert_to_numpy(out), ops.convert_to_numpy(new_cache)

    with no_grad():
        with monkeypatch.context() as keras_only:
            keras_only.setattr(sublayer_call, "_calls_directly", lambda *_: False)
            expected = step()
        direct = step()
    for ours, theirs in zip(direct, expected):
        np.testing.assert_array_equal(ours, theirs)


def test_a_block_run_without_its_own_call_goes_through_keras(
    keras_calls, monkeypatch
):
    """`block.call` under mixed precision opens no autocast scope: the
    sublayers' own `__call__` must (and `stateless_call` alike)."""
    layer = block("mixed_bfloat16")
    x, mask, positions = inputs()
    with no_grad():
        out = ops.convert_to_numpy(
            ops.cast(layer.call(ops.cast(x, "bfloat16"), mask, positions), "float32")
        )
        with monkeypatch.context() as keras_only:
            keras_only.setattr(sublayer_call, "_calls_directly", lambda *_: False)
            expected = ops.convert_to_numpy(
                ops.cast(
                    layer.call(ops.cast(x, "bfloat16"), mask, positions),
                    "float32",
                )
            )
    np.testing.assert_array_equal(out, expected)
    assert "query" in keras_calls


def test_sublayers_that_keras_must_call_go_through_keras(keras_calls):
    """Another variable dtype, remat, a forward hook, symbolic inputs,
    inputs of another dtype, an unbuilt layer."""
    parent = keras.layers.Dense(2)
    parent.build((1, 4))
    x = ops.ones((1, 4))
    other_variables = keras.layers.Dense(2, dtype="mixed_float16", name="mixed")
    with keras.RematScope(mode="full"):
        remat = keras.layers.Dense(2, name="remat")
    hooked = keras.layers.Dense(2, name="hooked")
    unbuilt = keras.layers.Dense(2, name="unbuilt")
    for layer in (other_variables, remat, hooked):
        layer.build((1, 4))
    hooked_calls = []
    if keras.config.backend() == "torch":
        hooked.register_forward_hook(lambda *_: hooked_calls.append(1))
    half_parent = keras.layers.Dense(2, dtype="float16")
    half_parent.build((1, 4))
    with no_grad():
        call_sublayer(half_parent, other_variables, ops.cast(x, "float16"))
        call_sublayer(parent, remat, x)
        call_sublayer(parent, hooked, x)
        symbolic = call_sublayer(parent, parent, keras.KerasTensor((1, 4)))
        call_sublayer(parent, parent, ops.cast(x, "float16"))
        call_sublayer(parent, unbuilt, x)
    assert isinstance(symbolic, keras.KerasTensor)
    assert keras_calls == [
        "mixed", "remat", "hooked", parent.name, parent.name, "unbuilt"
    ]
    if keras.config.backend() == "torch":
        assert hooked_calls == [1]


def test_generate_calls_the_blocks_directly_with_the_same_tokens(
    tiny_causal_lm, keras_calls, monkeypatch
):
    """The backbone's decode steps call each block as a block calls its
    sublayers: on PyTorch without the block's `Layer.__call__`."""
    inputs = {"images": np.full((1, 16, 16, 3), 0.5, "float32"),
              "prompts": ["caption en"]}
    blocks = tiny_causal_lm.backbone.decoder_blocks
    block_names = {block.name for block in blocks}

    def generate():
        keras_calls.clear()
        out = tiny_causal_lm.generate(inputs, max_length=24, strip_prompt=True)
        return out, [name for name in keras_calls if name in block_names]

    with monkeypatch.context() as keras_only:
        keras_only.setattr(sublayer_call, "_calls_directly", lambda *_: False)
        expected, blocks_through_keras = generate()
    direct, blocks_called = generate()
    assert direct == expected
    assert blocks_through_keras
    if keras.config.backend() == "torch":
        assert blocks_called == []


def test_a_cache_of_another_dtype_goes_through_keras(keras_calls, monkeypatch):
    """`Layer.__call__` casts a float32 cache for a bfloat16 block: a
    direct call would not, so the block goes through Keras."""
    layer = block("bfloat16")
    row, mask, positions, cache = decode_step_inputs()
    row = ops.cast(row, "bfloat16")

    def step():
        out, new_cache = call_sublayer(
            layer,
            layer,
            row,
            mask,
            positions,
            cache=ops.convert_to_tensor(cache.copy()),
            cache_update_index=5,
        )
        return [
            ops.convert_to_numpy(ops.cast(t, "float32"))
            for t in (out, new_cache)
        ] + [keras.backend.standardize_dtype(new_cache.dtype)]

    with no_grad():
        with monkeypatch.context() as keras_only:
            keras_only.setattr(sublayer_call, "_calls_directly", lambda *_: False)
            expected = step()
        keras_calls.clear()
        direct = step()
    assert layer.name in keras_calls
    np.testing.assert_array_equal(direct[0], expected[0])
    np.testing.assert_array_equal(direct[1], expected[1])
    assert direct[2] == expected[2] == "bfloat16"
