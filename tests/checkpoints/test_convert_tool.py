"""tools/convert_checkpoint.py end to end, in a fresh process."""

import os
import subprocess
import sys

import numpy as np
from keras import ops

import transformers_oracle as oracle
from conftest import BACKEND
from conftest import REPO
from keras_paligemma import PaliGemmaBackbone


def convert(*args):
    env = {**os.environ, "KERAS_BACKEND": BACKEND}
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args],
        capture_output=True, text=True, env=env,
    )


def test_hf_to_ours_and_back(tmp_path):
    reference = oracle.tiny_model(2, sliding_window=5)
    source = str(tmp_path / "hf")
    reference.save_pretrained(source)
    ours = str(tmp_path / "ours")
    result = convert("--from", "hf", source, "--to", ours)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "peak RSS" in result.stderr
    backbone = PaliGemmaBackbone.from_preset(ours)
    assert backbone.sliding_window == 5

    back = str(tmp_path / "back")
    result = convert("--from", "ours", ours, "--to", back, "--to-format", "hf")
    assert result.returncode == 0, result.stderr[-2000:]
    again = PaliGemmaBackbone.from_preset(back)
    by_path = {v.path: ops.convert_to_numpy(v) for v in backbone.weights}
    for variable in again.weights:
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), by_path[variable.path])

    refused = convert("--from", "hf", source, "--to", ours)
    assert refused.returncode != 0 and "overwrite=True" in refused.stderr


def test_keras_hub_to_ours(tmp_path):
    import keras
    import keras_hub

    from checkpoints.test_keras_hub_presets import TINY
    from conftest import TINY_PRESET
    from keras_paligemma import PaliGemmaCausalLM
    from keras_paligemma.checkpoints import keras_hub as keras_hub_checkpoint

    keras.utils.set_random_seed(4)
    vocabulary = os.path.join(TINY_PRESET, "assets", "tokenizer", "vocabulary.spm")
    with open(vocabulary, "rb") as f:
        tokenizer = keras_hub.models.PaliGemmaTokenizer(proto=f.read())
    source = str(tmp_path / "keras_hub")
    keras_hub.models.PaliGemmaCausalLM(
        backbone=keras_hub.models.PaliGemmaBackbone(**TINY),
        preprocessor=keras_hub.models.PaliGemmaCausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=16
        ),
    ).save_to_preset(source)
    ours = str(tmp_path / "ours")
    result = convert("--from", "keras_hub", source, "--to", ours)
    assert result.returncode == 0, result.stderr[-2000:]
    converted = PaliGemmaCausalLM.from_preset(ours)
    assert converted.preprocessor.sequence_length == 16
    expected = keras_hub_checkpoint.load_backbone(source)
    by_path = {v.path: ops.convert_to_numpy(v) for v in expected.weights}
    for variable in converted.backbone.weights:
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), by_path[variable.path])
