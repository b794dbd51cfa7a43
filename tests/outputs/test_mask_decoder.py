import os

import numpy as np
import pytest
from keras import ops

from keras_paligemma import MaskDecoder
from outputs import vae_reference


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    arrays = vae_reference.random_checkpoint(embedding_dim=8)
    path = os.path.join(tmp_path_factory.mktemp("vae"), "vae-oid.npz")
    np.savez(path, **arrays)
    return path, arrays


def test_decoder_matches_numpy_reference(checkpoint):
    path, arrays = checkpoint
    decoder = MaskDecoder.from_vae_checkpoint(path)
    assert decoder.embedding_dim == 8
    codes = np.random.default_rng(1).integers(0, 128, (3, 16))
    got = ops.convert_to_numpy(decoder(codes))
    assert got.shape == (3, 64, 64)
    for row, row_codes in enumerate(codes):
        expected = vae_reference.decode(row_codes, arrays)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got[row] / scale, expected / scale, atol=1e-5)


def test_incomplete_checkpoint_is_refused(checkpoint):
    _, arrays = checkpoint
    broken = {k: v for k, v in arrays.items() if k != "decoder.6.weight"}
    with pytest.raises(ValueError, match="decoder.6.weight"):
        MaskDecoder.from_vae_checkpoint(broken)
