"""Rotary position embedding (RoPE) as Gemma applies it, with per-row positions."""

from keras import ops

from keras_paligemma.layers import eager_ops


def rotary_angles(positions, head_dim, max_wavelength=10000):
    """`(sin, cos)` of every position's angles, each `(batch, length, 1,
    head_dim / 2)` float32: computed once for the queries and keys of a
    layer (`rotate`).

    >>> sin, cos = rotary_angles(ops.zeros((1, 3), "int32"), 8)
    >>> tuple(sin.shape), float(ops.max(cos))
    ((1, 3, 1, 4), 1.0)
    """
    half = head_dim // 2
    exponents = ops.arange(0, half, dtype="float32") * 2.0 / head_dim
    inverse_frequency = 1.0 / ops.power(float(max_wavelength), exponents)
    angles = eager_ops.cast(positions, "float32")[..., None] * inverse_frequency
    sin, cos = eager_ops.sin_cos(angles)
    return sin[:, :, None, :], cos[:, :, None, :]


def rotate(x, sin, cos):
    """`x (batch, length, heads, head_dim)` rotated by `rotary_angles`,
    the head dimension split in halves; same dtype as `x`."""
    half = ops.shape(x)[-1] // 2
    x32 = eager_ops.cast(x, "float32")
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = eager_ops.concatenate(
        [x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1
    )
    return eager_ops.cast(rotated, x.dtype)


def apply_rotary_embedding(x, positions, max_wavelength=10000):
    """Rotate `x` by its positions, splitting the head dimension in halves.

    Positions are given per row, so left-shifted or ragged batches rotate
    each token by its position in its own sequence.

    Args:
        x: tensor `(batch, length, heads, head_dim)`.
        positions: int tensor `(batch, length)`.
        max_wavelength: RoPE base.

    Returns:
        A tensor of the same shape and dtype as `x`.

    Example:

    >>> x = ops.ones((1, 1, 1, 4))
    >>> y = apply_rotary_embedding(x, ops.zeros((1, 1), "int32"))
    >>> ops.convert_to_numpy(y).ravel().tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    sin, cos = rotary_angles(positions, ops.shape(x)[-1], max_wavelength)
    return rotate(x, sin, cos)
