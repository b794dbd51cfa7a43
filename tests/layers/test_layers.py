import numpy as np
import pytest
from keras import ops

from keras_paligemma.layers.rms_norm import RMSNormalization
from keras_paligemma.layers.rotary import apply_rotary_embedding
from keras_paligemma.layers.vision_encoder import VisionEncoder


def test_rms_norm_matches_formula_with_one_plus_scale():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    norm = RMSNormalization(epsilon=1e-6)
    norm.build(x.shape)
    scale = np.linspace(-0.5, 0.5, 8).astype("float32")
    norm.scale.assign(scale)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * (1 + scale)
    np.testing.assert_allclose(ops.convert_to_numpy(norm(x)), expected, 1e-5)


def test_rotary_embedding_is_relative():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, 1, 1, 8)).astype("float32")
    k = rng.normal(size=(1, 1, 1, 8)).astype("float32")

    def score(query_position, key_position):
        rq = apply_rotary_embedding(q, np.array([[query_position]]))
        rk = apply_rotary_embedding(k, np.array([[key_position]]))
        return float(ops.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_vision_encoder_token_count_and_bad_size():
    encoder = VisionEncoder(42, 14, 8, 16, 2, 1, output_dim=6)
    assert tuple(encoder(np.zeros((1, 42, 42, 3))).shape) == (1, 9, 6)
    with pytest.raises(ValueError, match="vit_patch_size"):
        VisionEncoder(40, 14, 8, 16, 2, 1, output_dim=6)
