"""The VQ-VAE decoder that turns 16 `<seg###>` codes into a 64x64 mask."""

import keras
import numpy as np
from keras import ops

NUM_CODES = 16
CODEBOOK_SIZE = 128


class _ResBlock(keras.layers.Layer):
    """`x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))`."""

    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.conv_0 = keras.layers.Conv2D(channels, 3, padding="same", name="conv_0")
        self.conv_1 = keras.layers.Conv2D(channels, 3, padding="same", name="conv_1")
        self.conv_2 = keras.layers.Conv2D(channels, 1, name="conv_2")

    def build(self, input_shape):
        for conv in (self.conv_0, self.conv_1, self.conv_2):
            conv.build(input_shape)

    def call(self, x):
        h = ops.relu(self.conv_0(x))
        h = ops.relu(self.conv_1(h))
        return x + self.conv_2(h)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="keras_paligemma")
class MaskDecoder(keras.layers.Layer):
    """PaliGemma's segmentation-mask decoder (big_vision's `vae-oid`).

    The 16 codes index a 128-entry codebook; the embeddings, laid out
    row-major as a 4x4 grid, go through a 1x1 conv to 128 channels, two
    residual blocks and four stride-2 transposed convs (128, 64, 32, 16
    channels, each followed by ReLU) to 64x64, and a 1x1 conv to one
    channel. Values above 0 are inside the object.

    Args:
        embedding_dim: width of the codebook entries (read from the
            checkpoint by `from_vae_checkpoint`).

    Example:

    >>> decoder = MaskDecoder(embedding_dim=8)
    >>> tuple(decoder(np.zeros((2, 16), "int32")).shape)
    (2, 64, 64)
    """

    def __init__(self, embedding_dim=512, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.codebook = keras.layers.Embedding(
            CODEBOOK_SIZE, embedding_dim, name="codebook"
        )
        self.conv_in = keras.layers.Conv2D(128, 1, name="conv_in")
        self.res_blocks = [_ResBlock(128, name=f"res_block_{i}") for i in range(2)]
        self.upsample = [
            keras.layers.Conv2DTranspose(
                channels, 4, strides=2, padding="same", name=f"upsample_{i}"
            )
            for i, channels in enumerate((128, 64, 32, 16))
        ]
        self.conv_out = keras.layers.Conv2D(1, 1, name="conv_out")

    def build(self, input_shape):
        self.codebook.build(input_shape)
        self.conv_in.build((None, 4, 4, self.embedding_dim))
        for block in self.res_blocks:
            block.build((None, 4, 4, 128))
        channels, side = 128, 4
        for layer in self.upsample:
            layer.build((None, side, side, channels))
            channels, side = layer.filters, side * 2
        self.conv_out.build((None, side, side, channels))

    def call(self, codes):
        x = self.codebook(ops.cast(codes, "int32"))
        x = ops.reshape(x, (-1, 4, 4, self.embedding_dim))
        x = ops.relu(self.conv_in(x))
        for block in self.res_blocks:
            x = block(x)
        for layer in self.upsample:
            x = ops.relu(layer(x))
        return self.conv_out(x)[..., 0]

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim}

    @classmethod
    def from_vae_checkpoint(cls, path_or_arrays):
        """Build the decoder from big_vision's `vae-oid.npz` parameters.

        Args:
            path_or_arrays: path of the `.npz` file, or a mapping with its
                torch-style keys (`_vq_vae._embedding`, `decoder.0.weight`,
                `decoder.2.net.0.weight`, ..., `decoder.12.bias`).
        """
        if isinstance(path_or_arrays, (str, bytes)) or hasattr(
            path_or_arrays, "__fspath__"
        ):
            with np.load(path_or_arrays) as data:
                arrays = {k: data[k] for k in data.files}
        else:
            arrays = dict(path_or_arrays)
        missing = [k for k in _checkpoint_keys() if k not in arrays]
        if missing:
            raise ValueError(
                f"Not a PaliGemma VQ-VAE checkpoint: missing {missing[:4]}."
            )
        codebook = np.asarray(arrays["_vq_vae._embedding"], "float32")
        decoder = cls(embedding_dim=codebook.shape[1])
        decoder.build((None, NUM_CODES))
        decoder.codebook.set_weights([codebook])

        def conv(layer, prefix):
            kernel = np.asarray(arrays[prefix + ".weight"], "float32")
            # torch Conv2d (out, in, h, w) and ConvTranspose2d (in, out, h,
            # w) both become Keras (h, w, ., .) with the same transpose.
            layer.set_weights(
                [kernel.transpose(2, 3, 1, 0), arrays[prefix + ".bias"]]
            )

        conv(decoder.conv_in, "decoder.0")
        for block, index in zip(decoder.res_blocks, (2, 3)):
            conv(block.conv_0, f"decoder.{index}.net.0")
            conv(block.conv_1, f"decoder.{index}.net.2")
            conv(block.conv_2, f"decoder.{index}.net.4")
        for layer, index in zip(decoder.upsample, (4, 6, 8, 10)):
            conv(layer, f"decoder.{index}")
        conv(decoder.conv_out, "decoder.12")
        return decoder


def _checkpoint_keys():
    prefixes = ["decoder.0", "decoder.4", "decoder.6", "decoder.8"]
    prefixes += ["decoder.10", "decoder.12"]
    prefixes += [f"decoder.{b}.net.{i}" for b in (2, 3) for i in (0, 2, 4)]
    keys = [f"{p}.{kind}" for p in prefixes for kind in ("weight", "bias")]
    return ["_vq_vae._embedding"] + keys
