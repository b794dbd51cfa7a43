"""Presets saved before the output-first decoder kernels load unchanged."""

import json
import os
import shutil

import h5py
import keras
import numpy as np
import pytest

from conftest import TINY_PRESET
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.layers.kernel_layout import to_input_first

# Keras' weights-file layer names -> our kernel paths (under decoder_block_N).
FILE_LAYERS = {
    "attention/query_dense": "attention/query",
    "attention/key_dense": "attention/key",
    "attention/value_dense": "attention/value",
    "attention/output_dense": "attention/attention_output",
    "gate_dense": "gate",
    "up_dense": "up",
    "down_dense": "down",
}


def drop_layout_key(value):
    """`value` (a JSON config) without `decoder_kernel_layout`, anywhere."""
    if isinstance(value, dict):
        return {
            key: drop_layout_key(item)
            for key, item in value.items()
            if key != "decoder_kernel_layout"
        }
    if isinstance(value, list):
        return [drop_layout_key(item) for item in value]
    return value


def as_earlier_preset(preset_dir):
    """Rewrite a preset as presets were saved before the layout key: no
    `decoder_kernel_layout`, decoder kernels input-first."""
    for name in ("config.json", "task.json"):
        path = os.path.join(preset_dir, name)
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(drop_layout_key(config), f)
    with h5py.File(os.path.join(preset_dir, "model.weights.h5"), "r+") as f:
        names = []
        f.visit(names.append)
        for name in names:
            for file_layer, ours in FILE_LAYERS.items():
                if name.startswith("layers/decoder_block") and name.endswith(
                    f"/{file_layer}/vars/0"
                ):
                    value = to_input_first(f"decoder_block_0/{ours}/kernel", f[name][()])
                    del f[name]
                    f[name] = np.ascontiguousarray(value)


def hidden_states(backbone):
    rng = np.random.default_rng(0)
    size = backbone.image_size
    return keras.ops.convert_to_numpy(
        backbone(
            {
                "images": rng.uniform(-1, 1, (1, size, size, 3)).astype("float32"),
                "token_ids": np.array([[2, 7, 8, 1, 5]]),
                "padding_mask": np.ones((1, 5), "int32"),
                "response_mask": np.array([[0, 0, 0, 1, 1]]),
            }
        )
    )


def test_an_earlier_preset_loads_the_same_and_saves_the_current_layout(tmp_path):
    earlier = str(tmp_path / "earlier")
    shutil.copytree(TINY_PRESET, earlier)
    as_earlier_preset(earlier)
    with h5py.File(os.path.join(earlier, "model.weights.h5")) as f:
        assert f["layers/decoder_block/gate_dense/vars/0"].shape == (64, 128)

    expected = hidden_states(PaliGemmaBackbone.from_preset(TINY_PRESET))
    causal_lm = PaliGemmaCausalLM.from_preset(earlier)
    backbone = causal_lm.backbone
    assert tuple(backbone.decoder_blocks[0].gate_dense.kernel.shape) == (128, 64)
    np.testing.assert_array_equal(hidden_states(backbone), expected)

    # The transpose was for that file only: a current one loads as it is.
    backbone.load_weights(os.path.join(TINY_PRESET, "model.weights.h5"))
    np.testing.assert_array_equal(hidden_states(backbone), expected)

    causal_lm.save_to_preset(str(tmp_path / "current"))
    with open(tmp_path / "current" / "config.json") as f:
        assert json.load(f)["config"]["decoder_kernel_layout"] == "output_input"
    again = PaliGemmaBackbone.from_preset(str(tmp_path / "current"))
    np.testing.assert_array_equal(hidden_states(again), expected)


def test_an_earlier_quantized_preset_is_refused(tmp_path):
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.quantize("int8")
    causal_lm.save_to_preset(str(tmp_path / "int8"))
    as_earlier_preset(str(tmp_path / "int8"))
    with pytest.raises(ValueError, match="load the float preset and quantize"):
        PaliGemmaCausalLM.from_preset(str(tmp_path / "int8"))


def test_an_unknown_layout_is_refused():
    config = PaliGemmaBackbone.from_preset(TINY_PRESET).get_config()
    config["decoder_kernel_layout"] = "input_output"
    with pytest.raises(ValueError, match="`decoder_kernel_layout` must be"):
        PaliGemmaBackbone.from_config(config)


def test_earlier_lora_adapters_of_decoder_kernels_are_refused(tmp_path):
    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET)
    backbone.enable_lora(2)
    path = str(tmp_path / "earlier.lora.h5")
    backbone.save_lora_weights(path)
    with h5py.File(path, "r+") as f:
        del f.attrs["decoder_kernel_layout"]
    fresh = PaliGemmaBackbone.from_preset(TINY_PRESET)
    with pytest.raises(ValueError, match="cannot be converted: train them again"):
        fresh.load_lora_weights(path)
    vision_only = PaliGemmaBackbone.from_preset(TINY_PRESET)
    vision_only.enable_lora(2, targets=["vision"])
    vision_path = str(tmp_path / "vision.lora.h5")
    vision_only.save_lora_weights(vision_path)
    with h5py.File(vision_path, "r+") as f:
        del f.attrs["decoder_kernel_layout"]
    PaliGemmaBackbone.from_preset(TINY_PRESET).load_lora_weights(vision_path)


def test_a_current_file_loads_as_it_is_after_an_earlier_config():
    """An earlier config built without its weights (`load_weights=False`)
    still loads a current weights file unchanged."""
    current = PaliGemmaBackbone.from_preset(TINY_PRESET)
    backbone = PaliGemmaBackbone.from_config(drop_layout_key(current.get_config()))
    backbone.load_weights(os.path.join(TINY_PRESET, "model.weights.h5"))
    np.testing.assert_array_equal(hidden_states(backbone), hidden_states(current))
