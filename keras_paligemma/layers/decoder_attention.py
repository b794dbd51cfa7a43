"""Gemma / Gemma 2 grouped-query self-attention with a KV cache."""

import functools

import keras
from keras import ops

from keras_paligemma.layers import eager_ops
from keras_paligemma.layers.device import platform
from keras_paligemma.layers.rotary import rotary_angles
from keras_paligemma.layers.rotary import rotate
from keras_paligemma.layers.sublayer_call import call_sublayer
from keras_paligemma.layers.threaded_dense import ThreadedEinsumDense
from keras_paligemma.layers.window_cache import write_into_ring


def write_into_cache(cache, keys_values, index):
    """`cache` with `keys_values` written at slot `index`, without a copy.

    `cache` is one layer's `(batch, 2, slots, kv_heads, head_dim)`. Under
    XLA (JAX, TensorFlow) the update of a loop-carried buffer happens in
    place. Keras' `slice_update` clones the whole tensor on PyTorch, so
    there, outside autograd (generation), the slots are written in place:
    the caller owns the cache and never reads the old value again.
    """
    if keras.config.backend() == "torch":
        import torch

        if not torch.is_grad_enabled():
            length = keys_values.shape[2]
            cache.narrow(2, int(index), length).copy_(keys_values)
            return cache
    return ops.slice_update(cache, [0, 0, index, 0, 0], keys_values)


class DecoderAttention(keras.layers.Layer):
    """Grouped-query attention with RoPE, optional soft-cap and a KV cache.

    Queries are rotated, then scaled by `query_pre_attn_scalar ** -0.5`
    (Gemma 1 and Gemma 2 2B/9B use `head_dim`; Gemma 2 27B uses
    `hidden_dim / num_query_heads`). Scores and softmax run in float32.
    Without a soft-cap (PaliGemma 1), on a GPU with JAX or PyTorch,
    attention goes through `keras.ops.dot_product_attention`, which may
    pick a fused or flash kernel; soft-capped scores (PaliGemma 2), CPUs,
    TPUs and TensorFlow use this layer's own einsums.

    Args:
        num_query_heads: number of query heads.
        num_key_value_heads: number of key/value heads (divides the query
            heads; 1 is multi-query attention).
        head_dim: width of each head.
        query_pre_attn_scalar: queries are multiplied by its inverse square
            root.
        attention_logit_softcap: `None`, or `c` to squash scores with
            `c * tanh(scores / c)` (Gemma 2 uses 50).
        rope_max_wavelength: RoPE base.

    Call arguments:
        x: `(batch, length, hidden)` inputs.
        attention_mask: bool `(batch, length, keys)`, keys being the cache
            slots when a cache is given, else the inputs.
        positions: int `(batch, length)` positions of the inputs.
        cache: optional `(batch, 2, cache_length, kv_heads, head_dim)`;
            keys and values of the inputs are written at
            `cache_update_index` and attention runs over the whole cache.
        cache_update_index: where the inputs go in the cache: one slot for
            every row, or int `(batch,)` slots, one per row, for a single
            query into a sliding-window ring (`window_cache.py`).

    Returns:
        `outputs`, or `(outputs, updated_cache)` when a cache is given.
    """

    def __init__(
        self,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_softcap=None,
        rope_max_wavelength=10000,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                "`num_query_heads` must be a multiple of `num_key_value_heads`"
                f"; got {num_query_heads} and {num_key_value_heads}."
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_softcap = attention_logit_softcap
        self.rope_max_wavelength = rope_max_wavelength

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        common = dict(dtype=self.dtype_policy)
        self.query_dense = ThreadedEinsumDense(
            "btd,nhd->btnh",
            output_shape=(None, self.num_query_heads, self.head_dim),
            name="query",
            **common,
        )
        self.key_dense = ThreadedEinsumDense(
            "btd,nhd->btnh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            name="key",
            **common,
        )
        self.value_dense = ThreadedEinsumDense(
            "btd,nhd->btnh",
            output_shape=(None, self.num_key_value_heads, self.head_dim),
            name="value",
            **common,
        )
        self.output_dense = ThreadedEinsumDense(
            "btnh,dnh->btd",
            output_shape=(None, hidden_dim),
            name="attention_output",
            **common,
        )
        self.query_dense.build(input_shape)
        self.key_dense.build(input_shape)
        self.value_dense.build(input_shape)
        self.output_dense.build(
            (None, None, self.num_query_heads, self.head_dim)
        )

    def call(
        self, x, attention_mask, positions, cache=None, cache_update_index=0
    ):
        run = functools.partial(call_sublayer, self)  # see sublayer_call.py
        query = run(self.query_dense, x)
        key = run(self.key_dense, x)
        value = run(self.value_dense, x)
        sin, cos = rotary_angles(
            positions, self.head_dim, self.rope_max_wavelength
        )
        query, key = rotate(query, sin, cos), rotate(key, sin, cos)
        if cache is not None:
            keys_values = eager_ops.stack([key, value], axis=1)
            if len(getattr(cache_update_index, "shape", ())) == 1:
                cache = write_into_ring(cache, keys_values, cache_update_index)
            else:
                cache = write_into_cache(cache, keys_values, cache_update_index)
            key, value = cache[:, 0], cache[:, 1]
        outputs = self._attend(query, key, value, attention_mask)
        outputs = run(self.output_dense, outputs)
        if cache is None:
            return outputs
        return outputs, cache

    def _attend(self, query, key, value, attention_mask):
        if self._uses_keras_attention(query):
            return ops.dot_product_attention(
                query,
                key,
                value,
                mask=attention_mask[:, None, :, :],
                scale=self.query_pre_attn_scalar**-0.5,
            )
        return self._attend_in_float32(query, key, value, attention_mask)

    def _uses_keras_attention(self, query):
        """Whether `keras.ops.dot_product_attention` computes this layer's
        attention, so that Keras may pick a fused or flash kernel: on a GPU,
        with JAX or PyTorch (which accumulate scores and softmax in float32
        at any dtype), without a soft-cap (Keras' is
        `x / (1 + |x| / c)`, not Gemma 2's `c * tanh(x / c)`, and
        PyTorch's ignores it). On CPU our einsums are faster (PyTorch's
        kernel broadcasts a single key/value head slowly: 25x at batch 8),
        and TensorFlow has no fused kernel in Keras (and fails for one
        key/value head). Not on TPU: Keras' eager TPU kernel applies the
        first row's mask to every row."""
        return (
            not self.attention_logit_softcap
            and keras.config.backend() != "tensorflow"
            and platform(query) == "gpu"
        )

    def _attend_in_float32(self, query, key, value, attention_mask):
        batch, length = ops.shape(query)[0], ops.shape(query)[1]
        groups = self.num_query_heads // self.num_key_value_heads
        query = eager_ops.cast(query, "float32") * (
            self.query_pre_attn_scalar**-0.5
        )
        query = eager_ops.reshape(
            query,
            (batch, length, self.num_key_value_heads, groups, self.head_dim),
        )
        scores = eager_ops.einsum(
            "bqkgh,bskh->bkgqs", query, eager_ops.cast(key, "float32")
        )
        if self.attention_logit_softcap:
            cap = self.attention_logit_softcap
            scores = eager_ops.tanh(scores / cap) * cap
        mask = attention_mask[:, None, None, :, :]
        scores = eager_ops.where(mask, scores, -1e30)
        weights = eager_ops.softmax(scores, axis=-1)
        weights = eager_ops.cast(weights, value.dtype)
        outputs = eager_ops.einsum("bkgqs,bskh->bqkgh", weights, value)
        return eager_ops.reshape(
            outputs, (batch, length, self.num_query_heads, self.head_dim)
        )

    def get_config(self):
        return {
            **super().get_config(),
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_softcap": self.attention_logit_softcap,
            "rope_max_wavelength": self.rope_max_wavelength,
        }
