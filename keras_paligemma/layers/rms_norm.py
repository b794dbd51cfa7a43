"""Gemma's RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + scale)`, in float32."""

import keras
from keras import ops

from keras_paligemma.layers import eager_ops


class RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalization with Gemma's zero-centred scale.

    The scale is stored as an offset from one (initialised to zeros), and
    the normalization runs in float32 whatever the layer's dtype policy,
    as in the reference implementations.

    Example:

    >>> norm = RMSNormalization()
    >>> y = norm(ops.ones((1, 2, 4)) * 3.0)
    >>> [round(float(v), 4) for v in ops.convert_to_numpy(y)[0, 0]]
    [1.0, 1.0, 1.0, 1.0]
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )

    def call(self, x):
        x32 = eager_ops.cast(x, "float32")
        variance = eager_ops.mean(eager_ops.square(x32), -1, keepdims=True)
        normed = x32 * eager_ops.rsqrt(variance + self.epsilon)
        normed = normed * (1.0 + ops.cast(self.scale, "float32"))
        return eager_ops.cast(normed, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
