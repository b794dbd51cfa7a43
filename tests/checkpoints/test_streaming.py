"""Block-by-block assignment and the streaming weights writer."""

import os

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

from conftest import TINY_PRESET
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.checkpoints import in_place
from keras_paligemma.checkpoints import weights_file


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_assign_in_place_writes_block_by_block(dtype, monkeypatch):
    monkeypatch.setattr(in_place, "BLOCK_BYTES", 256)
    blocks = []
    writer = in_place._ROW_WRITERS[keras.config.backend()]
    monkeypatch.setitem(
        in_place._ROW_WRITERS, keras.config.backend(),
        lambda *args: (blocks.append(args[1]), writer(*args)),
    )
    variable = keras.Variable(np.zeros((50, 7), "float32"), dtype=dtype)
    # A bfloat16 transposed view, as checkpoints hand them over.
    source = np.random.default_rng(0).normal(size=(7, 50)).astype(ml_dtypes.bfloat16).T
    in_place.assign_in_place(variable, source)
    assert len(blocks) > 1 and blocks == sorted(blocks)
    got = keras.ops.convert_to_numpy(variable).astype("float32")
    np.testing.assert_array_equal(got, source.astype("float32"))
    small = keras.Variable(np.zeros((3,), "float32"), dtype=dtype)
    in_place.assign_in_place(small, np.arange(3, dtype="float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(small).astype("float32"), [0, 1, 2])


def _datasets(path):
    found = {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            found[name] = (item[()], dict(item.attrs))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return found


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_file_is_what_keras_writes(dtype, tmp_path, monkeypatch):
    monkeypatch.setattr(in_place, "BLOCK_BYTES", 4096)  # several blocks each
    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET, dtype=dtype)
    backbone.save_weights(str(tmp_path / "keras.weights.h5"))
    weights_file.save_weights(backbone, tmp_path / "ours.weights.h5")
    expected = _datasets(tmp_path / "keras.weights.h5")
    got = _datasets(tmp_path / "ours.weights.h5")
    assert sorted(got) == sorted(expected)
    for name, (value, attributes) in expected.items():
        assert got[name][0].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name][0], value, err_msg=name)
        assert got[name][1] == attributes, name


def test_sharded_preset_loads_back(tmp_path):
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    target = str(tmp_path / "preset")
    weights_file.save_preset(causal_lm, target, max_shard_size=0.0005)
    files = os.listdir(target)
    assert "model.weights.json" in files and "model_00001.weights.h5" in files
    # The backbone's own `save_weights` is back in place.
    assert "save_weights" not in vars(causal_lm.backbone)
    again = PaliGemmaCausalLM.from_preset(target)
    for a, b in zip(again.backbone.weights, causal_lm.backbone.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        weights_file.save_preset(causal_lm, target)
    assert "save_weights" not in vars(causal_lm.backbone)


def test_weights_file_names_are_checked(tmp_path):
    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        weights_file.save_weights(backbone, tmp_path / "model.h5")
    with pytest.raises(ValueError, match=r"\.weights\.json"):
        weights_file.save_weights(backbone, tmp_path / "model.weights.h5", max_shard_size=1)
