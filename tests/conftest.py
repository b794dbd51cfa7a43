"""Shared fixtures. The backend is fixed per process by `KERAS_BACKEND`."""

import os
import sys

import keras
import pytest

sys.path.insert(0, os.path.dirname(__file__))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PRESET = os.path.join(REPO, "presets", "pali_gemma_tiny_random")
BACKEND = keras.config.backend()


@pytest.fixture(scope="session")
def tiny_preset():
    return TINY_PRESET


@pytest.fixture
def tiny_causal_lm():
    import keras_paligemma

    return keras_paligemma.PaliGemmaCausalLM.from_preset(TINY_PRESET)
