"""A block's sublayers called without `Layer.__call__` in eager PyTorch
inference.

PyTorch runs `generate` eagerly (JAX and TensorFlow trace it once), so
Keras' `Layer.__call__` (argument binding, masks, name and autocast
scopes, dtype conversion of the inputs) is paid again by every sublayer
at every decode step: 12 calls per decoder block. Inside the block's own
`__call__`, a sublayer with the block's dtypes would open the autocast
scope that is already open, and its inputs are already in its dtype;
outside autograd there is nothing to rematerialize. There the sublayer's
`call` (or `quantized_call`) is called directly, with the same result. A
decode step of a tiny-width model took 13.0-13.7 against 18.9-19.4 ms
with 8 decoder layers, and 37.5-40.1 against 63.8-64.5 ms with 26 (one
process, interleaved). The backbone calls its blocks the same way when
it decodes with a cache (prefill and every step): 26 tiny-width blocks
took 32.6-33.1 against 37.0 ms a step.

Each condition is checked on every call, and anything else goes through
`layer(...)`: symbolic inputs, floating inputs (a KV cache included) of
another dtype, an autocast scope other than the one the sublayer would
open (a block run with `call` or `stateless_call`), PyTorch forward
hooks, activity regularizers, remat.
What a direct call skips besides: input-spec checks and Keras' argument
details in tracebacks.

Example:

>>> block = keras.layers.Dense(3)
>>> dense = keras.layers.Dense(2)
>>> block.build((1, 4)); dense.build((1, 4))
>>> tuple(call_sublayer(block, dense, ops.ones((1, 4))).shape)
(1, 2)
"""

import keras
from keras import ops  # noqa: F401 (the example)
from keras.src.backend.common.variables import get_autocast_scope


def call_sublayer(parent, layer, *args, **kwargs):
    """`layer(*args, **kwargs)`, called from `parent.call`; on PyTorch
    outside autograd, `layer.call` (or `quantized_call` for a quantized
    layer) directly where that is the same (see the module docstring)."""
    if _calls_directly(parent, layer, args, kwargs):
        if getattr(layer, "quantization_mode", None) is not None:
            return layer.quantized_call(*args, **kwargs)
        return layer.call(*args, **kwargs)
    return layer(*args, **kwargs)


def _calls_directly(parent, layer, args, kwargs):
    if keras.config.backend() != "torch":
        return False
    import torch
    from torch.nn.modules import module

    if torch.is_grad_enabled() or not layer.built:
        return False
    first = args[0] if args else None
    return (
        isinstance(first, torch.Tensor)
        and keras.backend.standardize_dtype(first.dtype) == layer.input_dtype
        and _floats_have_dtype(args[1:], kwargs, layer.input_dtype)
        and layer.compute_dtype == parent.compute_dtype
        and layer.variable_dtype == parent.variable_dtype
        and _autocast_is_the_layers_own(layer)
        and not getattr(layer, "_remat_mode", None)
        and layer.activity_regularizer is None
        and not (layer._forward_hooks or layer._forward_pre_hooks)
        and not module._global_forward_hooks
        and not module._global_forward_pre_hooks
    )


def _floats_have_dtype(args, kwargs, dtype):
    """Whether every floating tensor among the arguments (a KV cache
    included) has `dtype`, as `Layer.__call__` would cast them."""
    import torch

    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if keras.backend.standardize_dtype(value.dtype) != dtype:
                return False
    return True


def _autocast_is_the_layers_own(layer):
    """Whether the autocast scope now is the one `layer.__call__` would
    run `layer.call` in."""
    scope = get_autocast_scope()
    if scope is None:
        return layer.compute_dtype == layer.variable_dtype
    return layer.autocast and scope.dtype == layer.compute_dtype
