"""Keras ops of the decode step, PyTorch's own on PyTorch tensors.

PyTorch runs `generate` eagerly (JAX and TensorFlow trace it once), so
each Keras op's dispatch (the symbolic-input check, conversions, dtype
rules) is paid again for every op of every block at every decode step:
`ops.reshape` took 17 us against 1 us for the tensor's own, `ops.mean`
13 against 4, `ops.where` 16 against 6, `ops.stack` 16 against 2.

Each function here computes what its `keras.ops` namesake computes for
the arguments the decode path passes (one integer axis; tensors on one
device, as Keras places them). On PyTorch, for tensors of one floating
dtype (Python numbers where the function says so), it calls PyTorch's
op directly; anything else (JAX, TensorFlow, symbolic inputs, Keras
variables, integer or mixed dtypes, other axes) goes through
`keras.ops`, dtype rules included.

Example:

>>> x = ops.ones((1, 2, 4))
>>> tuple(reshape(x, (2, 4)).shape), float(mean(x, axis=-1)[0, 0])
((2, 4), 1.0)
"""

import functools

import keras
from keras import ops


def _torch_for(*tensors, only_float32=False):
    """The `torch` module when the backend is PyTorch and `tensors` are
    PyTorch tensors of one floating dtype (float32 with `only_float32`:
    where Keras computes other dtypes differently), else `None`."""
    if keras.config.backend() != "torch":
        return None
    import torch

    dtype = tensors[0].dtype if isinstance(tensors[0], torch.Tensor) else None
    if dtype is None or not dtype.is_floating_point:
        return None
    if only_float32 and dtype != torch.float32:
        return None
    for tensor in tensors[1:]:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype:
            return None
    return torch


def tensor(x):
    """`x` as a backend tensor: a PyTorch tensor as it is, anything else
    through `ops.convert_to_tensor` (a Keras variable's value honours the
    autocast scope)."""
    if keras.config.backend() == "torch":
        import torch

        if isinstance(x, torch.Tensor):
            return x
    return ops.convert_to_tensor(x)


def cast(x, dtype):
    """`ops.cast(x, dtype)`; a PyTorch tensor of any dtype is returned as
    it is when it has `dtype`, else converted by `Tensor.to`."""
    if keras.config.backend() == "torch":
        import torch

        if isinstance(x, torch.Tensor):
            target = _torch_dtype(dtype)
            return x if x.dtype == target else x.to(target)
    return ops.cast(x, dtype)


@functools.cache
def _torch_dtype(dtype):
    from keras.src.backend.torch.core import to_torch_dtype

    return to_torch_dtype(dtype)


def reshape(x, shape):
    """`ops.reshape(x, shape)`; a Keras variable is read first on PyTorch,
    and any PyTorch tensor (of any dtype) reshapes itself."""
    if keras.config.backend() == "torch" and not isinstance(
        x, keras.KerasTensor
    ):
        return tensor(x).reshape(shape)
    return ops.reshape(x, shape)


def square(x):
    """`ops.square(x)`."""
    if torch := _torch_for(x):
        return torch.square(x)
    return ops.square(x)


def mean(x, axis, keepdims=False):
    """`ops.mean(x, axis, keepdims)` over one integer axis (Keras
    averages a 16-bit `x` in float32)."""
    torch = _torch_for(x, only_float32=True)
    if torch and isinstance(axis, int):
        return torch.mean(x, dim=axis, keepdim=keepdims)
    return ops.mean(x, axis=axis, keepdims=keepdims)


def rsqrt(x):
    """`ops.rsqrt(x)`."""
    if torch := _torch_for(x):
        return torch.rsqrt(x)
    return ops.rsqrt(x)


def tanh(x):
    """`ops.tanh(x)`."""
    if torch := _torch_for(x):
        return torch.tanh(x)
    return ops.tanh(x)


def sin_cos(x):
    """`(ops.sin(x), ops.cos(x))`."""
    if torch := _torch_for(x):
        return torch.sin(x), torch.cos(x)
    return ops.sin(x), ops.cos(x)


def gelu_tanh(x):
    """`keras.activations.gelu(x, approximate=True)`: GELU with the tanh
    approximation, Gemma's FFW activation."""
    if torch := _torch_for(x):
        return torch.nn.functional.gelu(x, approximate="tanh")
    return ops.gelu(x, approximate=True)


def softmax(x, axis=-1):
    """`ops.softmax(x, axis)` over one integer axis (Keras runs float16
    in float32 on CPU; float32 is the case checked against it)."""
    torch = _torch_for(x, only_float32=True)
    if torch and isinstance(axis, int):
        return torch.softmax(x, dim=axis)
    return ops.softmax(x, axis=axis)


def where(condition, x, y):
    """`ops.where(condition, x, y)` for a boolean `condition`, a tensor
    `x` and a Python number or a tensor `y` (with a number, a float32 `x`
    only: the case checked against Keras, which converts the number)."""
    if isinstance(y, (int, float)):
        torch = _torch_for(x, only_float32=True)
    else:
        torch = _torch_for(x, y)
    if torch and isinstance(condition, torch.Tensor):
        if condition.dtype == torch.bool:
            return torch.where(condition, x, y)
    return ops.where(condition, x, y)


def concatenate(xs, axis):
    """`ops.concatenate(xs, axis)`."""
    if torch := _torch_for(*xs):
        return torch.cat(list(xs), dim=axis)
    return ops.concatenate(xs, axis=axis)


def stack(xs, axis):
    """`ops.stack(xs, axis)`."""
    if torch := _torch_for(*xs):
        return torch.stack(list(xs), dim=axis)
    return ops.stack(xs, axis=axis)


def einsum(equation, *operands):
    """`ops.einsum(equation, *operands)`."""
    if torch := _torch_for(*operands):
        return torch.einsum(equation, *operands)
    return ops.einsum(equation, *operands)
