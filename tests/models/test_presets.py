import os

import numpy as np
import pytest
from keras import ops

from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM

# Logits of the shipped preset (saved on JAX) at the last prompt token for
# a fixed input, recorded once: every backend must reproduce them.
SHIPPED_LOGITS = [0.0764466, 0.1695362, -0.0303910, 0.5517046, 4.3470855, 0.2644768]


def fixed_input(causal_lm):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype="uint8")
    return causal_lm.preprocessor.generate_preprocess(
        {"images": [image], "prompts": ["caption en"]}, sequence_length=12
    )


def test_save_and_load_round_trip_generates_the_same(tiny_causal_lm, tmp_path):
    x = {"images": np.zeros((2, 30, 30, 3), "uint8"),
         "prompts": ["caption en", "ocr"]}
    before = tiny_causal_lm.generate(x, max_length=20)
    directory = os.path.join(tmp_path, "preset")
    tiny_causal_lm.save_to_preset(directory)
    restored = PaliGemmaCausalLM.from_preset(directory)
    assert restored.generate(x, max_length=20) == before
    for a, b in zip(restored.get_weights(), tiny_causal_lm.get_weights()):
        np.testing.assert_array_equal(a, b)
    backbone = PaliGemmaBackbone.from_preset(directory)
    assert backbone.get_config() == tiny_causal_lm.backbone.get_config()


def test_save_refuses_to_overwrite(tiny_causal_lm, tmp_path):
    directory = os.path.join(tmp_path, "preset")
    os.makedirs(directory)
    with open(os.path.join(directory, "mine.txt"), "w") as f:
        f.write("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_causal_lm.save_to_preset(directory)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_causal_lm.backbone.save_to_preset(directory)
    assert os.listdir(directory) == ["mine.txt"]
    tiny_causal_lm.save_to_preset(directory, overwrite=True)
    assert "model.weights.h5" in os.listdir(directory)


def test_shipped_preset_matches_on_every_backend(tiny_causal_lm):
    x = fixed_input(tiny_causal_lm)
    n = int(ops.convert_to_numpy(x["padding_mask"]).sum())
    logits = ops.convert_to_numpy(tiny_causal_lm.score(
        x["images"], x["token_ids"], x["padding_mask"]
    ))[0, n - 1, :6]
    np.testing.assert_allclose(logits, SHIPPED_LOGITS, atol=1e-4)
