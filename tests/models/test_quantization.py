"""Weight quantization and bfloat16 inference on the trained shapes preset."""

import os
import sys

import numpy as np
import pytest
from keras import ops

from conftest import REPO
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM

sys.path.insert(0, os.path.join(REPO, "tools"))

import shapes_task  # noqa: E402
import train_shapes  # noqa: E402

SHAPES_PRESET = os.path.join(REPO, "presets", "pali_gemma_shapes")


@pytest.fixture(scope="module")
def held_out():
    return shapes_task.make_dataset(48, seed=2_024)


@pytest.fixture(scope="module")
def float_metrics(held_out):
    return train_shapes.evaluate(PaliGemmaCausalLM.from_preset(SHAPES_PRESET), held_out)


def logits(causal_lm, held_out):
    x = causal_lm.preprocessor.generate_preprocess(
        {"images": held_out["images"][:4], "prompts": held_out["prompts"][:4]},
        sequence_length=24,
    )
    x = {key: ops.convert_to_numpy(value) for key, value in x.items()}
    x["response_mask"] = np.zeros_like(x["padding_mask"])
    return ops.convert_to_numpy(ops.cast(causal_lm(x), "float32"))


# int8 must stay within 2 points of float; int4 may lose a little more.
@pytest.mark.parametrize("mode, tolerance", [("int8", 0.02), ("int4", 0.1)])
def test_quantized_preset_keeps_accuracy_and_round_trips(
    mode, tolerance, held_out, float_metrics, tmp_path
):
    causal_lm = PaliGemmaCausalLM.from_preset(SHAPES_PRESET)
    causal_lm.quantize(mode)  # before any call: the preprocessor is left alone
    kernel = causal_lm.backbone.decoder_blocks[0].attention.query_dense
    assert kernel.quantization_mode == mode
    metrics = train_shapes.evaluate(causal_lm, held_out)
    print(mode, "held-out", metrics, "float", float_metrics)
    for task, value in float_metrics.items():
        assert metrics[task] >= value - tolerance, task

    if mode == "int4":
        with pytest.raises(ValueError, match="do not reload exactly"):
            causal_lm.save_to_preset(tmp_path / mode)
        return
    causal_lm.save_to_preset(tmp_path / mode)
    loaded = PaliGemmaCausalLM.from_preset(str(tmp_path / mode))
    assert loaded.backbone.decoder_blocks[0].attention.query_dense.quantization_mode == mode
    # The backbone alone loads quantized too (keras-hub's own backbone
    # loader drops the saved policy map).
    backbone = PaliGemmaBackbone.from_preset(str(tmp_path / mode))
    assert backbone.token_embedding.quantization_mode == mode
    np.testing.assert_allclose(
        logits(loaded, held_out), logits(causal_lm, held_out), atol=1e-5
    )
    float_size = os.path.getsize(os.path.join(SHAPES_PRESET, "model.weights.h5"))
    quantized_size = os.path.getsize(tmp_path / mode / "model.weights.h5")
    print(mode, "weights file", quantized_size, "float", float_size)
    assert quantized_size < 0.5 * float_size


def test_bfloat16_inference_is_finite_and_answers_like_float32(held_out, float_metrics):
    causal_lm = PaliGemmaCausalLM.from_preset(SHAPES_PRESET, dtype="bfloat16")
    assert causal_lm.backbone.token_embedding.embeddings.dtype == "bfloat16"
    values = logits(causal_lm, held_out)
    assert np.all(np.isfinite(values))
    metrics = train_shapes.evaluate(causal_lm, held_out)
    for task, value in float_metrics.items():
        assert metrics[task] >= value - 0.02, task
