"""A block's sublayers called without `Layer.__call__` in eager PyTorch
inference.

PyTorch runs `generate` eagerly (JAX and TensorFlow trace it once), so
Keras' `Layer.__call__` (argument binding, masks, name and autocast
scopes, dtype conversion of the inputs) is paid again by every sublayer
at every decode step: 12 calls per decoder block. Inside the block's own
`__call__`, a sublayer with the block's compute and variable dtypes would
open the same autocast scope the block already opened, and its inputs are
already in that dtype; outside autograd there is nothing to
rematerialize. So there the sublayer's `call` (or `quantized_call`) is
called directly, which gives the same result. A decode step of a tiny-width
model took 13.0-13.7 against 18.9-19.4 ms with 8 decoder layers, and
37.5-40.1 against 63.8-64.5 ms with 26 (one process, interleaved).

Example:

>>> block = keras.layers.Dense(3)
>>> dense = keras.layers.Dense(2)
>>> block.build((1, 4)); dense.build((1, 4))
>>> tuple(call_sublayer(block, dense, ops.ones((1, 4))).shape)
(1, 2)
"""

import keras
from keras import ops  # noqa: F401 (the example)


def call_sublayer(parent, layer, *args, **kwargs):
    """`layer(*args, **kwargs)`, called from `parent.call`; on PyTorch
    outside autograd, `layer.call` (or `quantized_call` for a quantized
    layer) directly when `layer` is built, shares `parent`'s compute and
    variable dtypes and is not rematerialized."""
    if _calls_directly(parent, layer):
        if getattr(layer, "quantization_mode", None) is not None:
            return layer.quantized_call(*args, **kwargs)
        return layer.call(*args, **kwargs)
    return layer(*args, **kwargs)


def _calls_directly(parent, layer):
    if keras.config.backend() != "torch":
        return False
    import torch

    return (
        not torch.is_grad_enabled()
        and layer.built
        and not getattr(layer, "_remat_mode", None)
        and layer.compute_dtype == parent.compute_dtype
        and layer.variable_dtype == parent.variable_dtype
    )
