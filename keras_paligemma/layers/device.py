"""Where a computation runs: CPU or an accelerator."""

import keras


def on_accelerator(x=None):
    """Whether JAX computes on a GPU or TPU, or PyTorch tensor `x` is on
    one; False on TensorFlow (not needed there).

    >>> on_accelerator()  # the tests run on CPU
    False
    """
    if keras.config.backend() == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if keras.config.backend() == "torch" and x is not None:
        return x.device.type != "cpu"
    return False
