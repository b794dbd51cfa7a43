"""Rotary position embedding (RoPE) as Gemma applies it, with per-row positions."""

from keras import ops


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
    head_dim = ops.shape(x)[-1]
    half = head_dim // 2
    exponents = ops.arange(0, half, dtype="float32") * 2.0 / head_dim
    inverse_frequency = 1.0 / ops.power(float(max_wavelength), exponents)
    angles = ops.cast(positions, "float32")[..., None] * inverse_frequency
    sin = ops.sin(angles)[:, :, None, :]
    cos = ops.cos(angles)[:, :, None, :]
    x32 = ops.cast(x, "float32")
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return ops.cast(rotated, x.dtype)
