"""The decoder's kernels are stored (output, input); other formats' are not.

A decode step multiplies one row per sequence by every decoder kernel,
so it is bound by how fast the kernels are read. XLA:CPU (JAX) read the
decoder kernels of PaliGemma 2 3B at 0.73-0.8x the speed in their
Keras/keras-hub `(input, output)` layout (`x @ kernel`) that it reached
with the same kernels stored `(output, input)` and contracted over both
last axes (21-32 against 28-44 GB/s, one process, interleaved; PyTorch
and TensorFlow read both layouts alike). So the decoder's query, key,
value, attention-output, gate, up and down kernels are stored with their
output axes first, as in PyTorch's `Linear`:

| kernel | Keras / keras-hub / big_vision | stored here |
|---|---|---|
| query, key, value | (hidden, heads, head_dim) | (heads, head_dim, hidden) |
| attention_output | (heads, head_dim, hidden) | (hidden, heads, head_dim) |
| gate, up | (hidden, ffw) | (ffw, hidden) |
| down | (ffw, hidden) | (hidden, ffw) |

Converters write and read arrays in the input-first layout of the other
formats; `from_input_first` and `to_input_first` move a variable's array
between the two. Presets saved before this layout (their config lacks
`decoder_kernel_layout`) are read through `read_input_first_files`.

Example:

>>> import numpy as np
>>> kernel = np.zeros((8, 2, 4))  # (hidden, heads, head_dim)
>>> from_input_first("decoder_block_0/attention/query/kernel", kernel).shape
(2, 4, 8)
>>> to_input_first("decoder_block_0/down/kernel", np.zeros((8, 32))).shape
(32, 8)
>>> from_input_first("vision_encoder/projector/kernel", kernel).shape
(8, 2, 4)
"""

import re

import numpy as np

DECODER_KERNEL_LAYOUT = "output_input"
"""The backbone config's `decoder_kernel_layout`: the layout above."""

_FROM_INPUT_FIRST = {
    "attention/query": (1, 2, 0),
    "attention/key": (1, 2, 0),
    "attention/value": (1, 2, 0),
    "attention/attention_output": (2, 0, 1),
    "gate": (1, 0),
    "up": (1, 0),
    "down": (1, 0),
}
_DECODER_KERNEL = re.compile(r"^decoder_block_\d+/(.+)/kernel$")


def permutation(path):
    """The axes order taking the input-first kernel at variable `path` to
    the stored one, or `None` for a variable stored as other formats do."""
    match = _DECODER_KERNEL.match(path)
    return _FROM_INPUT_FIRST.get(match.group(1)) if match else None


def from_input_first(path, array):
    """`array`, in the input-first layout, as stored at variable `path`
    (a transposed view for a decoder kernel, else `array` itself; also
    `array` itself when its rank is not the kernel's, for the caller's
    shape check to report)."""
    order = permutation(path)
    if order is None or len(array.shape) != len(order):
        return array
    return np.transpose(array, order)


def to_input_first(path, array):
    """The stored `array` of variable `path` in the input-first layout."""
    order = permutation(path)
    return array if order is None else np.transpose(array, np.argsort(order))


def read_input_first_files(model):
    """Make `model`'s decoder dense layers read input-first kernels.

    For configs saved before `DECODER_KERNEL_LAYOUT` existed: each layer's
    `load_own_variables` then transposes its stored kernel on the way in.
    Saving writes the current layout. Quantized kernels are refused (their
    scales were laid out for the input-first kernel).
    """
    for layer in model._flatten_layers(include_self=False, recursive=True):
        kernel = getattr(layer, "_kernel", None)
        if kernel is None or permutation(kernel.path) is None:
            continue
        if layer.quantization_mode is not None:
            raise ValueError(
                f"This {layer.quantization_mode}-quantized model stores its "
                "decoder kernels input-first, as presets did before "
                "`decoder_kernel_layout`; load the float preset and quantize "
                "it again."
            )
        layer.input_first_files = True
