"""`platform`: where a computation runs."""

from types import SimpleNamespace

import pytest

from conftest import BACKEND
from keras_paligemma.layers.device import platform


def test_platform_is_a_known_name():
    assert platform() in ("cpu", "gpu", "tpu")


@pytest.mark.skipif(BACKEND != "torch", reason="a PyTorch tensor's device")
@pytest.mark.parametrize("device, name", [("cuda", "gpu"), ("cpu", "cpu")])
def test_torch_tensor_device(device, name):
    tensor = SimpleNamespace(device=SimpleNamespace(type=device))
    assert platform(tensor) == name
