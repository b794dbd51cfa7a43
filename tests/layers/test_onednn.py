"""oneDNN's linear or MKL's on PyTorch CPU: measured once, and a build
without oneDNN's falls back."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers import onednn
from keras_paligemma.layers.threaded_matmul import threaded_matmul

RNG = np.random.default_rng(0)


def numpy(x):
    return ops.convert_to_numpy(x)


def test_onednn_or_mkl_is_measured_once(monkeypatch):
    if keras.config.backend() != "torch" or onednn.linear() is None:
        pytest.skip("oneDNN's linear is a PyTorch CPU path")
    import time

    import torch

    measured = []
    monkeypatch.setattr(
        onednn, "faster", lambda *args: measured.append(args) or False
    )
    onednn.beats_mkl.cache_clear()
    try:
        state = torch.random.get_rng_state()
        x = RNG.normal(size=(8, 12)).astype("float32")
        kernel = torch.from_numpy(RNG.normal(size=(12, 40)).astype("float32"))
        with torch.no_grad():
            for _ in range(3):
                out = threaded_matmul(x, kernel)
        np.testing.assert_allclose(numpy(out), x @ numpy(kernel), atol=1e-5)
        assert len(measured) == 1  # then cached
        assert torch.equal(torch.random.get_rng_state(), state)
    finally:
        onednn.beats_mkl.cache_clear()
    monkeypatch.undo()
    assert onednn.beats_mkl() in (True, False)

    slow, fast = (lambda: time.sleep(0.02)), (lambda: time.sleep(0.001))
    assert onednn.faster(fast, slow, 2) and not onednn.faster(slow, fast, 2)
    # Faster, but not by a margin of 100x.
    assert not onednn.faster(fast, slow, 2, margin=100)


def test_without_onednn_products_fall_back_to_blocks(monkeypatch):
    if keras.config.backend() != "torch":
        pytest.skip("oneDNN's linear is a PyTorch CPU path")
    import torch

    available = onednn.linear() is not None
    onednn.linear.cache_clear()
    monkeypatch.setattr(torch.ops, "mkldnn", object())  # a build without it
    try:
        assert onednn.linear() is None
        x = RNG.normal(size=(8, 12)).astype("float32")
        kernel = RNG.normal(size=(12, 40)).astype("float32")
        with torch.no_grad():
            out = threaded_matmul(x, kernel)
        np.testing.assert_allclose(numpy(out), x @ kernel, atol=1e-5)
    finally:
        monkeypatch.undo()
        onednn.linear.cache_clear()
    assert (onednn.linear() is not None) == available
