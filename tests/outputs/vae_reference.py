"""An independent NumPy implementation of PaliGemma's VQ-VAE mask decoder.

Written from the architecture description (torch-style parameters:
Conv2d weights `(out, in, kh, kw)`, ConvTranspose2d weights
`(in, out, kh, kw)` with stride 2 and padding 1), with explicit loops, to
check the Keras `MaskDecoder` and its checkpoint loader.
"""

import numpy as np


def random_checkpoint(embedding_dim=8, seed=0):
    rng = np.random.default_rng(seed)

    def conv(out_channels, in_channels, size):
        scale = 1.0 / np.sqrt(in_channels * size * size)
        weight = rng.normal(0, scale, (out_channels, in_channels, size, size))
        return weight.astype("float32"), rng.normal(0, 0.1, out_channels).astype("float32")

    arrays = {"_vq_vae._embedding": rng.normal(0, 1, (128, embedding_dim)).astype("float32")}

    def put(prefix, pair):
        arrays[prefix + ".weight"], arrays[prefix + ".bias"] = pair

    put("decoder.0", conv(128, embedding_dim, 1))
    for block in (2, 3):
        put(f"decoder.{block}.net.0", conv(128, 128, 3))
        put(f"decoder.{block}.net.2", conv(128, 128, 3))
        put(f"decoder.{block}.net.4", conv(128, 128, 1))
    in_channels = 128
    for index, out_channels in zip((4, 6, 8, 10), (128, 64, 32, 16)):
        weight, bias = conv(out_channels, in_channels, 4)
        # ConvTranspose2d stores (in, out, kh, kw).
        arrays[f"decoder.{index}.weight"] = np.ascontiguousarray(
            rng.normal(0, 1 / np.sqrt(in_channels * 4), (in_channels, out_channels, 4, 4)).astype("float32")
        )
        arrays[f"decoder.{index}.bias"] = bias
        in_channels = out_channels
    put("decoder.12", conv(1, 16, 1))
    return arrays


def conv2d(x, weight, bias):
    """`x` (C, H, W); torch Conv2d with stride 1 and 'same' padding."""
    out_channels, _, size, _ = weight.shape
    pad = size // 2
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    height, width = x.shape[1:]
    out = np.zeros((out_channels, height, width), "float64")
    for i in range(size):
        for j in range(size):
            patch = padded[:, i : i + height, j : j + width]
            out += np.einsum("oc,chw->ohw", weight[:, :, i, j], patch)
    return out + bias[:, None, None]


def conv_transpose2d(x, weight, bias, stride=2, padding=1):
    """torch ConvTranspose2d: out[o, s*y - p + i, s*x - p + j] += ..."""
    _, out_channels, size, _ = weight.shape
    height, width = x.shape[1:]
    full = np.zeros(
        (out_channels, (height - 1) * stride + size, (width - 1) * stride + size)
    )
    for y in range(height):
        for x_ in range(width):
            contribution = np.einsum("c,cokl->okl", x[:, y, x_], weight)
            full[:, y * stride : y * stride + size, x_ * stride : x_ * stride + size] += contribution
    out_height = (height - 1) * stride - 2 * padding + size
    out_width = (width - 1) * stride - 2 * padding + size
    cropped = full[:, padding : padding + out_height, padding : padding + out_width]
    return cropped + bias[:, None, None]


def decode(codes, arrays):
    """16 codes -> the 64x64 mask logits."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    embedding = arrays["_vq_vae._embedding"][np.asarray(codes)]
    x = embedding.reshape(4, 4, -1).transpose(2, 0, 1).astype("float64")
    x = relu(conv2d(x, arrays["decoder.0.weight"], arrays["decoder.0.bias"]))
    for block in (2, 3):
        h = relu(conv2d(x, arrays[f"decoder.{block}.net.0.weight"], arrays[f"decoder.{block}.net.0.bias"]))
        h = relu(conv2d(h, arrays[f"decoder.{block}.net.2.weight"], arrays[f"decoder.{block}.net.2.bias"]))
        x = x + conv2d(h, arrays[f"decoder.{block}.net.4.weight"], arrays[f"decoder.{block}.net.4.bias"])
    for index in (4, 6, 8, 10):
        x = relu(conv_transpose2d(x, arrays[f"decoder.{index}.weight"], arrays[f"decoder.{index}.bias"]))
    return conv2d(x, arrays["decoder.12.weight"], arrays["decoder.12.bias"])[0]
