"""Several images per example (NLVR2-style checkpoints)."""

import numpy as np
import pytest
from keras import ops

import keras_paligemma as kp


@pytest.fixture
def two_image_lm(tiny_preset):
    single = kp.PaliGemmaCausalLM.from_preset(tiny_preset)
    config = {**single.backbone.get_config(), "num_images": 2}
    backbone = kp.PaliGemmaBackbone.from_config(config)
    by_path = {v.path: v for v in single.backbone.weights}
    for variable in backbone.weights:
        variable.assign(by_path[variable.path])
    preprocessor = kp.PaliGemmaCausalLMPreprocessor(
        tokenizer=single.preprocessor.tokenizer,
        image_converter=single.preprocessor.image_converter,
        sequence_length=24,
        num_images=2,
    )
    return kp.PaliGemmaCausalLM(backbone, preprocessor)


def images(count, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (30 + 7 * i, 40, 3), dtype="uint8") for i in range(count)]


def test_lists_of_images_are_packed_and_padded(two_image_lm):
    a, b, c = images(3, 0)
    x = two_image_lm.preprocessor.generate_preprocess(
        {"images": [[a, b], [c]], "prompts": ["caption en", "ocr"]}
    )
    assert tuple(x["images"].shape) == (2, 2, 56, 56, 3)
    np.testing.assert_array_equal(x["image_mask"], [[1, 1], [1, 0]])
    assert not np.asarray(x["images"])[1, 1].any()


def test_missing_images_are_masked_and_order_matters(two_image_lm):
    a, b, c = images(3, 1)
    x = two_image_lm.preprocessor.generate_preprocess(
        {"images": [[a, b], [c]], "prompts": ["caption en", "ocr"]}
    )
    x = {k: ops.convert_to_numpy(v) for k, v in x.items()}

    def logits(batch):
        return ops.convert_to_numpy(two_image_lm.score(
            batch["images"], batch["token_ids"], batch["padding_mask"],
            image_mask=batch["image_mask"],
        ))

    reference = logits(x)
    garbage = {**x, "images": x["images"].copy()}
    garbage["images"][1, 1] = np.random.default_rng(2).uniform(-1, 1, (56, 56, 3))
    np.testing.assert_allclose(logits(garbage)[1], reference[1], atol=1e-5)
    unmasked = {**garbage, "image_mask": np.ones((2, 2), "int32")}
    assert np.abs(logits(unmasked)[1] - reference[1]).max() > 1e-3
    swapped = {**x, "images": x["images"][:, ::-1].copy()}
    assert np.abs(logits(swapped)[0] - reference[0]).max() > 1e-3


def test_generate_with_two_images(two_image_lm):
    a, b, c = images(3, 3)
    answers = two_image_lm.generate(
        {"images": [[a, b], [c]], "prompts": ["caption en", "ocr"]}
    )
    assert [t.split("\n")[0] for t in answers] == ["caption en", "ocr"]
    # Row 2 alone equals row 2 in the batch: padding an image changes nothing.
    alone = two_image_lm.generate({"images": [[c]], "prompts": ["ocr"]})
    assert alone[0].startswith(answers[1]) or answers[1].startswith(alone[0])


def test_mismatched_num_images_is_refused(two_image_lm, tiny_preset):
    single = kp.PaliGemmaCausalLM.from_preset(tiny_preset)
    with pytest.raises(ValueError, match="num_images"):
        kp.PaliGemmaCausalLM(two_image_lm.backbone, single.preprocessor)
    with pytest.raises(ValueError, match="1 to 2 images"):
        two_image_lm.preprocessor.generate_preprocess(
            {"images": [images(3, 0)], "prompts": ["ocr"]}
        )
