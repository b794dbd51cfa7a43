"""The examples in our docstrings run and print what they claim."""

import doctest
import importlib
import os

import pytest

from conftest import REPO

MODULES = [
    "keras_paligemma.layers.attention_mask",
    "keras_paligemma.layers.rms_norm",
    "keras_paligemma.layers.rotary",
    "keras_paligemma.layers.window_cache",
    "keras_paligemma.layers.threaded_matmul",
    "keras_paligemma.layers.threaded_dense",
    "keras_paligemma.layers.kernel_layout",
    "keras_paligemma.layers.onednn",
    "keras_paligemma.layers.row_product",
    "keras_paligemma.layers.sublayer_call",
    "keras_paligemma.layers.reversible_embedding",
    "keras_paligemma.layers.int8_matmul_jax",
    "keras_paligemma.layers.int8_matmul_tf",
    "keras_paligemma.layers.device",
    "keras_paligemma.layers.vision_encoder",
    "keras_paligemma.models.backbone",
    "keras_paligemma.models.tokenizer",
    "keras_paligemma.models.image_converter",
    "keras_paligemma.models.preprocessor",
    "keras_paligemma.models.causal_lm",
    "keras_paligemma.models.fine_tuning",
    "keras_paligemma.models.fit_inputs",
    "keras_paligemma.models.kernel_layout_config",
    "keras_paligemma.models.generate_compile",
    "keras_paligemma.models.layout_map",
    "keras_paligemma.models.shared_images",
    "keras_paligemma.outputs.detection",
    "keras_paligemma.outputs.segmentation",
    "keras_paligemma.outputs.mask_decoder",
    "keras_paligemma.outputs.drawing",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(REPO)
    module = importlib.import_module(name)
    import numpy as np
    from keras import ops

    result = doctest.testmod(
        module, extraglobs={"np": np, "ops": ops}, verbose=False
    )
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
    assert os.getcwd() == REPO
