"""Decoder attention: `keras.ops.dot_product_attention` where it is exact,
our float32 einsums elsewhere."""

import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_paligemma.layers import decoder_attention
from keras_paligemma.layers.decoder_attention import DecoderAttention

FUSED_BACKENDS = ("jax", "torch")


def on_platform(monkeypatch, name):
    monkeypatch.setattr(decoder_attention, "platform", lambda x=None: name)


@pytest.fixture
def accelerator(monkeypatch):
    """Take the path a GPU takes, on this CPU."""
    on_platform(monkeypatch, "gpu")


def attention_inputs(heads, kv_heads, dtype, seed=0):
    rng = np.random.default_rng(seed)
    batch, length, keys, head_dim = 2, 5, 7, 16
    query = rng.normal(size=(batch, length, heads, head_dim)) * 3
    key = rng.normal(size=(batch, keys, kv_heads, head_dim)) * 3
    value = rng.normal(size=(batch, keys, kv_heads, head_dim))
    mask = rng.random((batch, length, keys)) > 0.4
    mask[0, 1] = False  # a padded query: no key at all
    tensors = [ops.cast(t.astype("float32"), dtype) for t in (query, key, value)]
    return (*tensors, mask)


def reference(query, key, value, mask, scale, cap=None):
    """float64 attention of the (rounded) inputs, masked rows uniform."""
    query, key, value = (
        ops.convert_to_numpy(ops.cast(t, "float32")).astype("float64")
        for t in (query, key, value)
    )
    groups = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, groups, 2), np.repeat(value, groups, 2)
    scores = np.einsum("btnh,bsnh->bnts", query, key) * scale
    if cap:
        scores = cap * np.tanh(scores / cap)
    scores = np.where(mask[:, None], scores, -1e30)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, value)


def spy_on_fused_attention(monkeypatch):
    calls = []
    original = ops.dot_product_attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "dot_product_attention", recording)
    return calls


@pytest.mark.parametrize("name", ["cpu", "tpu"])
def test_cpu_and_tpu_keep_the_float32_einsums(name, monkeypatch):
    """On CPU the einsums are faster (torch's kernel broadcasts one
    key/value head slowly); on TPU Keras' eager kernel would apply the
    first row's mask to every row."""
    on_platform(monkeypatch, name)
    calls = spy_on_fused_attention(monkeypatch)
    layer = DecoderAttention(8, 1, 16, query_pre_attn_scalar=16)
    query, key, value, mask = attention_inputs(8, 1, "float32")
    layer._attend(query, key, value, mask)
    assert not calls


@pytest.mark.parametrize("heads,kv_heads", [(8, 1), (4, 2), (2, 2)])
def test_attention_without_soft_cap_is_fused_on_accelerators(
    heads, kv_heads, monkeypatch, accelerator
):
    calls = spy_on_fused_attention(monkeypatch)
    layer = DecoderAttention(heads, kv_heads, 16, query_pre_attn_scalar=16)
    query, key, value, mask = attention_inputs(heads, kv_heads, "float32")
    outputs = ops.convert_to_numpy(layer._attend(query, key, value, mask))
    einsums = layer._attend_in_float32(query, key, value, mask)
    # TensorFlow keeps the einsums: Keras has no fused kernel there and
    # fails for a single key/value head.
    assert len(calls) == (BACKEND in FUSED_BACKENDS)
    np.testing.assert_allclose(
        outputs, ops.convert_to_numpy(einsums), atol=1e-5
    )
    np.testing.assert_allclose(
        outputs, reference(query, key, value, mask, 0.25), atol=1e-5
    )


def test_soft_capped_attention_keeps_the_float32_einsums(
    monkeypatch, accelerator
):
    """Keras' soft-cap is `x / (1 + |x| / c)`, not Gemma 2's tanh (and
    PyTorch's ignores it): soft-capped layers never take the fused path."""
    calls = spy_on_fused_attention(monkeypatch)
    layer = DecoderAttention(4, 2, 16, 16, attention_logit_softcap=2.0)
    query, key, value, mask = attention_inputs(4, 2, "float32")
    outputs = ops.convert_to_numpy(layer._attend(query, key, value, mask))
    assert not calls
    np.testing.assert_allclose(
        outputs, reference(query, key, value, mask, 0.25, cap=2.0), atol=1e-5
    )
    uncapped = reference(query, key, value, mask, 0.25)
    assert np.abs(outputs - uncapped).max() > 1e-2  # the cap matters here


@pytest.mark.skipif(
    BACKEND not in FUSED_BACKENDS, reason="TensorFlow keeps the einsums"
)
def test_fused_bfloat16_attention_is_as_accurate_as_the_einsums(accelerator):
    layer = DecoderAttention(8, 1, 16, 16, dtype="bfloat16")
    query, key, value, mask = attention_inputs(8, 1, "bfloat16", seed=1)
    exact = reference(query, key, value, mask, 0.25)

    def error(outputs):
        outputs = ops.convert_to_numpy(ops.cast(outputs, "float32"))
        assert np.isfinite(outputs).all()
        return np.abs(outputs - exact).max()

    fused = error(layer._attend(query, key, value, mask))
    einsums = error(layer._attend_in_float32(query, key, value, mask))
    # bfloat16 spacing at the outputs' size (|outputs| < 4) is 2**-6.
    assert fused <= max(einsums, 2**-6)


@pytest.mark.skipif(BACKEND != "jax", reason="inspects XLA:CPU's compiled HLO")
def test_a_compiled_decode_step_reads_the_kernels_in_place():
    """One query row against a cache, compiled: XLA copies no kernel.

    With Keras' einsum for the output projection XLA:CPU copied its
    kernel into the attention output's head order on every call."""
    import re

    import jax

    hidden, heads, kv_heads, head_dim, keys = 48, 4, 2, 8, 10
    layer = DecoderAttention(
        num_query_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, query_pre_attn_scalar=head_dim,
        attention_logit_softcap=50.0,
    )
    layer.build((1, 1, hidden))

    def step(weights, x, mask, cache):
        (out, cache), _ = layer.stateless_call(
            weights, [], x, mask, np.array([[3]]), cache=cache,
            cache_update_index=3,
        )
        return out, cache

    weights = [v.value for v in layer.trainable_variables]
    text = jax.jit(step).lower(
        weights,
        np.ones((1, 1, hidden), "float32"),
        np.ones((1, 1, keys), bool),
        np.zeros((1, 2, keys, kv_heads, head_dim), "float32"),
    ).compile().as_text()
    kernel_sizes = {int(np.prod(w.shape)) for w in weights if w.ndim == 3}
    assert kernel_sizes == {hidden * heads * head_dim, hidden * kv_heads * head_dim}
    copied = [
        line.strip()
        for line in text.splitlines()
        if (found := re.search(r"= f32\[([\d,]*)\]\S* (copy|transpose)\(", line))
        and np.prod([int(d) for d in found.group(1).split(",")]) in kernel_sizes
    ]
    assert not copied, copied
