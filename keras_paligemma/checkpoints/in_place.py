"""Write arrays into Keras variables in place, one block of rows at a time.

Converting a checkpoint must not hold a second copy of the model, nor of
its largest tensor (the 257,152-row token embedding: 2.4 GB in float32 for
PaliGemma 2 3B). The variables already own their memory, so a checkpoint
array is kept in the file's dtype (often bfloat16, half the size) and
converted to the variable's dtype one block of `BLOCK_BYTES` at a time,
each block written straight into the variable's buffer: a sliced
`assign` on TensorFlow, a sliced `copy_` on torch and a buffer-donating
`dynamic_update_slice` on JAX (which reuses the old buffer instead of
allocating a new one). Arrays smaller than one block are assigned whole.

`release_freed_memory` hands the memory of dropped arrays back to the
operating system (glibc otherwise keeps it for reuse: over 1.5 GB after
reading the ~1,000 tensors of PaliGemma 2 3B).
"""

import ctypes
import functools

import keras
import numpy as np

BLOCK_BYTES = 64 * 2**20


def numpy_dtype(dtype):
    """The numpy dtype for a Keras dtype name (`"bfloat16"` via ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def rows_per_block(shape, itemsize):
    """How many leading-axis rows of an array of `shape` fill one block."""
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def assign_in_place(variable, array):
    """`variable.assign(array)` converting and writing block by block.

    Args:
        variable: a `keras.Variable` with the shape of `array`.
        array: a numpy array (any float dtype, any memory layout: views
            such as transposes are fine; each block is made contiguous).
    """
    dtype = numpy_dtype(variable.dtype)
    rows = rows_per_block(array.shape, dtype.itemsize)
    write_rows = _ROW_WRITERS.get(keras.config.backend())
    if array.ndim == 0 or array.shape[0] <= rows or write_rows is None:
        variable.assign(np.asarray(array, dtype=dtype))
        return
    for start in range(0, array.shape[0], rows):
        block = np.ascontiguousarray(array[start : start + rows], dtype=dtype)
        write_rows(variable, start, block)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or `None` where the C library is not glibc."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory():
    """Return freed heap memory to the operating system (glibc only).

    Converters call this after each tensor, so that memory freed while
    reading and converting one tensor does not stay resident.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _write_rows_tensorflow(variable, start, block):
    variable.value[start : start + len(block)].assign(
        keras.ops.convert_to_tensor(block, dtype=variable.dtype)
    )


def _write_rows_torch(variable, start, block):
    import torch

    with torch.no_grad():
        variable.value[start : start + len(block)].copy_(
            keras.ops.convert_to_tensor(block, dtype=variable.dtype)
        )


@functools.cache
def _donating_update():
    import jax

    def update(buffer, block, start):
        return jax.lax.dynamic_update_slice_in_dim(buffer, block, start, axis=0)

    return jax.jit(update, donate_argnums=0)


def _write_rows_jax(variable, start, block):
    # The old buffer is donated: XLA writes the block into it and hands it
    # back, so no second buffer of the variable's size is ever allocated.
    # Waiting for each update keeps JAX's asynchronous dispatch from
    # holding the device copies of all the blocks at once.
    updated = _donating_update()(variable.value, block, start)
    variable.assign(updated.block_until_ready())


_ROW_WRITERS = {
    "jax": _write_rows_jax,
    "tensorflow": _write_rows_tensorflow,
    "torch": _write_rows_torch,
}
