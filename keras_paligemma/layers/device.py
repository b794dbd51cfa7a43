"""Where a computation runs: `"cpu"`, `"gpu"` or `"tpu"`."""

import keras


def platform(x=None):
    """The platform JAX computes on, PyTorch tensor `x` is on, or
    TensorFlow places its ops on (a GPU when one is visible).

    >>> platform() in ("cpu", "gpu", "tpu")
    True
    """
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return jax.default_backend()
    if backend == "torch":
        if x is None:
            import torch

            return "gpu" if torch.cuda.is_available() else "cpu"
        return "gpu" if x.device.type == "cuda" else x.device.type
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"
