"""SigLIP vision encoder (So400m/14 in PaliGemma) and its linear projector."""

import keras
from keras import ops

from keras_paligemma.layers.threaded_dense import (
    ThreadedDense,
    ThreadedEinsumDense,
)


class VisionEncoderBlock(keras.layers.Layer):
    """Pre-LayerNorm ViT block: `x + mha(ln(x))`, then `x + mlp(ln(x))`."""

    def __init__(
        self, hidden_dim, intermediate_dim, num_heads, epsilon=1e-6, **kwargs
    ):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"`vit_hidden_dim` ({hidden_dim}) must be a multiple of "
                f"`vit_num_heads` ({num_heads})."
            )
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.epsilon = epsilon
        head_dim = hidden_dim // num_heads
        common = dict(dtype=self.dtype_policy)

        def heads(name):
            return ThreadedEinsumDense(
                "btd,dnh->btnh",
                (None, num_heads, head_dim),
                bias_axes="nh",
                name=name,
                **common,
            )

        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=epsilon, name="attention_norm", **common
        )
        self.query_dense = heads("query")
        self.key_dense = heads("key")
        self.value_dense = heads("value")
        self.attention_output = ThreadedEinsumDense(
            "btnh,nhd->btd",
            (None, hidden_dim),
            bias_axes="d",
            name="attention_output",
            **common,
        )
        self.mlp_norm = keras.layers.LayerNormalization(
            epsilon=epsilon, name="mlp_norm", **common
        )
        self.mlp_in = ThreadedDense(intermediate_dim, name="mlp_in", **common)
        self.mlp_out = ThreadedDense(hidden_dim, name="mlp_out", **common)

    def build(self, input_shape):
        head_dim = self.hidden_dim // self.num_heads
        for layer in (
            self.attention_norm,
            self.query_dense,
            self.key_dense,
            self.value_dense,
            self.mlp_norm,
            self.mlp_in,
        ):
            layer.build(input_shape)
        self.attention_output.build((None, None, self.num_heads, head_dim))
        self.mlp_out.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))

    def call(self, x):
        h = self.attention_norm(x)
        attended = ops.dot_product_attention(
            self.query_dense(h), self.key_dense(h), self.value_dense(h)
        )
        x = x + self.attention_output(attended)
        h = keras.activations.gelu(
            self.mlp_in(self.mlp_norm(x)), approximate=True
        )
        return x + self.mlp_out(h)

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_heads": self.num_heads,
            "epsilon": self.epsilon,
        }


class VisionEncoder(keras.layers.Layer):
    """SigLIP ViT without pooling, followed by PaliGemma's linear projector.

    Patches of `patch_size` pixels are embedded by a strided convolution,
    learned position embeddings are added (one per patch), the blocks run,
    a final LayerNorm is applied, and a Dense layer projects every patch
    to the decoder width. A 224 px image gives 256 tokens, 448 px 1024,
    896 px 4096.

    Args:
        image_size: side of the square input image in pixels.
        patch_size: side of a patch (14 in PaliGemma).
        hidden_dim, intermediate_dim, num_heads, num_layers: ViT sizes.
        output_dim: decoder width the tokens are projected to.
        epsilon: LayerNorm epsilon.

    Example:

    >>> encoder = VisionEncoder(28, 14, 8, 16, 2, 1, output_dim=6)
    >>> tuple(encoder(ops.zeros((2, 28, 28, 3))).shape)
    (2, 4, 6)
    """

    def __init__(
        self,
        image_size,
        patch_size,
        hidden_dim,
        intermediate_dim,
        num_heads,
        num_layers,
        output_dim,
        epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if image_size % patch_size:
            raise ValueError(
                f"`image_size` ({image_size}) must be a multiple of "
                f"`vit_patch_size` ({patch_size})."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.output_dim = output_dim
        self.epsilon = epsilon
        self.num_patches = (image_size // patch_size) ** 2
        common = dict(dtype=self.dtype_policy)
        self.patch_embedding = keras.layers.Conv2D(
            hidden_dim,
            kernel_size=patch_size,
            strides=patch_size,
            padding="valid",
            name="patch_embedding",
            **common,
        )
        self.encoder_blocks = [
            VisionEncoderBlock(
                hidden_dim,
                intermediate_dim,
                num_heads,
                epsilon=epsilon,
                name=f"block_{i}",
                **common,
            )
            for i in range(num_layers)
        ]
        self.encoder_norm = keras.layers.LayerNormalization(
            epsilon=epsilon, name="encoder_norm", **common
        )
        self.projector = ThreadedDense(
            output_dim, name="projector", **common
        )

    def build(self, input_shape):
        self.patch_embedding.build((None, self.image_size, self.image_size, 3))
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(self.num_patches, self.hidden_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
        )
        tokens_shape = (None, self.num_patches, self.hidden_dim)
        for block in self.encoder_blocks:
            block.build(tokens_shape)
        self.encoder_norm.build(tokens_shape)
        self.projector.build(tokens_shape)

    def call(self, images):
        patches = self.patch_embedding(ops.cast(images, self.compute_dtype))
        x = ops.reshape(patches, (-1, self.num_patches, self.hidden_dim))
        x = x + ops.cast(self.position_embedding, self.compute_dtype)
        for block in self.encoder_blocks:
            x = block(x)
        return self.projector(self.encoder_norm(x))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_patches, self.output_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "output_dim": self.output_dim,
            "epsilon": self.epsilon,
        }
