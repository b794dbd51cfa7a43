"""Several prompts per image: same answers as one image per prompt, and
each image goes through SigLIP once."""

import os
import sys

import numpy as np
import pytest

from conftest import REPO
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.models.shared_images import flatten_prompt_groups

sys.path.insert(0, os.path.join(REPO, "tools"))
import shapes_task  # noqa: E402

PROMPTS = ["caption en", "answer en what color is the circle?", "detect square"]


@pytest.fixture(scope="module")
def shapes_lm():
    """The shipped shapes preset: its answers depend on the image."""
    return PaliGemmaCausalLM.from_preset(
        os.path.join(REPO, "presets", "pali_gemma_shapes")
    )


def images(count):
    return list(shapes_task.make_dataset(count, seed=11)["images"])


def record_encoded_batches(causal_lm):
    """Patch `encode_images` to record the batch of every call."""
    backbone, batches = causal_lm.backbone, []
    encode = backbone.encode_images

    def recording(pixels):
        batches.append(int(pixels.shape[0]))
        return encode(pixels)

    backbone.encode_images = recording
    return batches


def test_one_image_many_prompts_equals_repeating_the_image(shapes_lm):
    image = images(1)[0]
    repeated = shapes_lm.generate(
        {"images": [image] * 3, "prompts": PROMPTS}, max_length=40
    )
    batches = record_encoded_batches(shapes_lm)
    shared = shapes_lm.generate(
        {"images": image, "prompts": PROMPTS}, max_length=40
    )
    assert shared == repeated
    assert batches == [1]  # traced or run once, on one image


def test_lists_of_prompts_per_image_come_back_grouped(shapes_lm):
    three = images(3)
    groups = [PROMPTS[:2], ["caption en"], PROMPTS]
    batches = record_encoded_batches(shapes_lm)
    grouped = shapes_lm.generate(
        {"images": three, "prompts": groups}, max_length=40, strip_prompt=True
    )
    assert batches == [3]
    # The same rows, one image per row (same padding, same answer budget).
    flat = shapes_lm.generate(
        {
            "images": [three[0]] * 2 + [three[1]] + [three[2]] * 3,
            "prompts": [p for group in groups for p in group],
        },
        max_length=40,
        strip_prompt=True,
    )
    assert grouped == [flat[:2], flat[2:3], flat[3:]]
    captions = [grouped[0][0], grouped[1][0], grouped[2][0]]
    assert len(set(captions)) > 1, captions  # the images really differ


def test_answer_asks_a_list_of_questions_about_one_image(shapes_lm):
    image = images(1)[0]
    questions = ["what color is the circle?", "what color is the square?"]
    answers = shapes_lm.answer(image, questions)
    assert [a.prompt for a in answers] == [f"answer en {q}" for q in questions]
    one = shapes_lm.answer([image], questions[1:])
    assert answers[1].text == one[0].text


def test_preprocessing_maps_prompts_to_images():
    flat = flatten_prompt_groups(
        {"images": images(2), "prompts": [["a", "b"], ["c"]],
         "responses": [["x", "y"], ["z"]]}
    )
    assert flat["prompts"] == ["a", "b", "c"]
    assert flat["responses"] == ["x", "y", "z"]
    assert flat["image_index"].tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "x, message",
    [
        ({"images": images(2), "prompts": [["a"]]}, "1 lists of prompts"),
        ({"images": images(1), "prompts": [["a"], "b"]}, "one non-empty list"),
        ({"images": images(1), "prompts": [[]]}, "one non-empty list"),
        ({"images": images(1), "prompts": [["a"]], "responses": ["x"]},
         "nested like `prompts`"),
    ],
)
def test_bad_prompt_groups_are_refused(x, message):
    with pytest.raises(ValueError, match=message):
        flatten_prompt_groups(x)


def test_images_that_match_no_prompt_layout_are_refused(shapes_lm):
    token_ids = np.ones((3, 8), "int32")
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        shapes_lm.generate_step({
            "images": np.zeros((2, 56, 56, 3), "float32"),
            "token_ids": token_ids, "padding_mask": token_ids,
        })
