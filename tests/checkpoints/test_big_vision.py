"""big_vision .npz checkpoints load and match transformers on the same weights."""

import os

import numpy as np
import pytest
from keras import ops

import transformers_oracle as oracle
from checkpoints import big_vision_writer
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma.checkpoints import big_vision


@pytest.mark.parametrize("generation", [1, 2])
def test_npz_matches_transformers(generation, tmp_path):
    reference = oracle.tiny_model(generation, sliding_window=3)
    path = os.path.join(tmp_path, "paligemma.npz")
    big_vision_writer.write(reference, path)
    options = {}
    if generation == 2:
        options = dict(query_pre_attn_scalar=12, sliding_window=3)
    backbone = big_vision.load_backbone(path, **options)
    rng = np.random.default_rng(8)
    token_ids = rng.integers(3, 1100, (2, 9)).astype("int32")
    padding_mask = np.ones((2, 9), "int32")
    padding_mask[1, 7:] = 0
    response_mask = (np.arange(9) >= 5).astype("int32")[None].repeat(2, 0) * padding_mask
    x = rng.uniform(-1, 1, (2, 28, 28, 3)).astype("float32")
    expected = oracle.logits(reference, x, token_ids, padding_mask, response_mask)
    hidden = backbone({"images": x, "token_ids": token_ids,
                       "padding_mask": padding_mask, "response_mask": response_mask})
    got = ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))
    valid = padding_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() < 1e-4
    # from_preset recognises the .npz file too.
    assert PaliGemmaBackbone.from_preset(path).num_layers == backbone.num_layers


def test_bfloat16_npz_is_read_as_bfloat16(tmp_path):
    import ml_dtypes

    reference = oracle.tiny_model(1)
    path = os.path.join(tmp_path, "bf16.npz")
    big_vision_writer.write(reference, path, bfloat16=True)
    backbone = big_vision.load_backbone(path)
    embedding = reference.state_dict()["model.language_model.embed_tokens.weight"]
    expected = embedding.float().numpy().astype(ml_dtypes.bfloat16).astype("float32")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(backbone.token_embedding.embeddings), expected
    )


def test_corrupted_and_incomplete_files_are_named(tmp_path):
    reference = oracle.tiny_model(1)
    path = os.path.join(tmp_path, "good.npz")
    big_vision_writer.write(reference, path)
    truncated = os.path.join(tmp_path, "truncated.npz")
    with open(path, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        big_vision.load_backbone(truncated)
    arrays = dict(np.load(path))
    del arrays["params/llm/final_norm/scale"]
    incomplete = os.path.join(tmp_path, "incomplete.npz")
    np.savez(incomplete, **arrays)
    with pytest.raises(ValueError, match="llm/final_norm/scale"):
        big_vision.load_backbone(incomplete)
