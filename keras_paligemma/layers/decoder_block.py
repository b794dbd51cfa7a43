"""One Gemma / Gemma 2 decoder block: pre-norm attention and GeGLU FFW."""

import functools

import keras
from keras import ops

from keras_paligemma.layers import eager_ops
from keras_paligemma.layers.decoder_attention import DecoderAttention
from keras_paligemma.layers.rms_norm import RMSNormalization
from keras_paligemma.layers.sublayer_call import call_sublayer
from keras_paligemma.layers.threaded_dense import ThreadedEinsumDense


class DecoderBlock(keras.layers.Layer):
    """A residual decoder block of Gemma (PaliGemma 1) or Gemma 2.

    `x + attention(norm(x))`, then `x + ffw(norm(x))` with the GeGLU
    feed-forward `down(gelu_tanh(gate(h)) * up(h))`. Gemma 2 adds an
    RMSNorm on each branch output before the residual add
    (`use_post_norms=True`).

    Args:
        hidden_dim: model width.
        intermediate_dim: FFW hidden width (the width of `gate` and of `up`,
            as in HF's `intermediate_size`).
        num_query_heads, num_key_value_heads, head_dim,
        query_pre_attn_scalar, attention_logit_softcap: see
            `DecoderAttention`.
        use_post_norms: Gemma 2's post-attention and post-FFW norms.
        layer_norm_epsilon: RMSNorm epsilon.

    Call arguments: as `DecoderAttention`, with `x` of width `hidden_dim`,
    and `output_index`: `None`, or the index of the one query whose output
    is needed; the feed-forward then runs on that row alone (attention
    still writes every query's keys and values to the cache).
    """

    def __init__(
        self,
        hidden_dim,
        intermediate_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim,
        query_pre_attn_scalar,
        attention_logit_softcap=None,
        use_post_norms=False,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.attention_logit_softcap = attention_logit_softcap
        self.use_post_norms = use_post_norms
        self.layer_norm_epsilon = layer_norm_epsilon

        def norm(name):
            return RMSNormalization(
                epsilon=layer_norm_epsilon, dtype=self.dtype_policy, name=name
            )

        def dense(equation, output_shape, name):
            return ThreadedEinsumDense(
                equation, output_shape, dtype=self.dtype_policy, name=name
            )

        self.pre_attention_norm = norm("pre_attention_norm")
        self.attention = DecoderAttention(
            num_query_heads=num_query_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            query_pre_attn_scalar=query_pre_attn_scalar,
            attention_logit_softcap=attention_logit_softcap,
            dtype=self.dtype_policy,
            name="attention",
        )
        self.pre_ffw_norm = norm("pre_ffw_norm")
        self.gate_dense = dense("btd,fd->btf", (None, intermediate_dim), "gate")
        self.up_dense = dense("btd,fd->btf", (None, intermediate_dim), "up")
        self.down_dense = dense("btf,df->btd", (None, hidden_dim), "down")
        if use_post_norms:
            self.post_attention_norm = norm("post_attention_norm")
            self.post_ffw_norm = norm("post_ffw_norm")

    def build(self, input_shape):
        ffw_shape = tuple(input_shape[:-1]) + (self.intermediate_dim,)
        self.pre_attention_norm.build(input_shape)
        self.attention.build(input_shape)
        self.pre_ffw_norm.build(input_shape)
        self.gate_dense.build(input_shape)
        self.up_dense.build(input_shape)
        self.down_dense.build(ffw_shape)
        if self.use_post_norms:
            self.post_attention_norm.build(input_shape)
            self.post_ffw_norm.build(input_shape)

    def rematerialized_call(self, layer_call, *args, **kwargs):
        """Recompute the block from its hidden states (`enable_remat`).

        The mask and positions are closed over rather than passed through
        the recomputed function: TensorFlow's remat (`custom_gradient`)
        cannot differentiate with respect to a boolean mask and takes no
        keyword arguments in graph mode. A call with a KV cache decodes,
        has no backward pass and runs unwrapped.
        """
        cache = kwargs.get("cache", args[3] if len(args) > 3 else None)
        if cache is not None:
            return layer_call
        if not args:  # hidden states by keyword: remat as Keras does
            return super().rematerialized_call(layer_call, *args, **kwargs)
        x, *others = args

        def from_hidden_states(x):
            return layer_call(x, *others, **kwargs)

        recomputed = super().rematerialized_call(
            from_hidden_states, *args, **kwargs
        )
        return lambda x, *_, **__: recomputed(x)

    def call(
        self,
        x,
        attention_mask,
        positions,
        cache=None,
        cache_update_index=0,
        output_index=None,
    ):
        run = functools.partial(call_sublayer, self)  # see sublayer_call.py
        attended = run(
            self.attention,
            run(self.pre_attention_norm, x),
            attention_mask=attention_mask,
            positions=positions,
            cache=cache,
            cache_update_index=cache_update_index,
        )
        if cache is not None:
            attended, cache = attended
        if output_index is not None:
            # The row's size is a literal, not an argument.
            row = [ops.shape(x)[0], 1, self.hidden_dim]
            x = ops.slice(x, [0, output_index, 0], row)
            attended = ops.slice(attended, [0, output_index, 0], row)
        if self.use_post_norms:
            attended = run(self.post_attention_norm, attended)
        x = x + attended

        h = run(self.pre_ffw_norm, x)
        gate = eager_ops.gelu_tanh(run(self.gate_dense, h))
        ffw = run(self.down_dense, gate * run(self.up_dense, h))
        if self.use_post_norms:
            ffw = run(self.post_ffw_norm, ffw)
        x = x + ffw
        if cache is None:
            return x
        return x, cache

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_query_heads": self.num_query_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attention_logit_softcap": self.attention_logit_softcap,
            "use_post_norms": self.use_post_norms,
            "layer_norm_epsilon": self.layer_norm_epsilon,
        }
