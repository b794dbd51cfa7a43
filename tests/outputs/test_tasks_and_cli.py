"""caption/answer/ocr/detect/segment, drawing and the CLI on a tuned model."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from conftest import BACKEND
from conftest import REPO
from conftest import TINY_PRESET
import keras_paligemma as kp
from outputs import encoding
from outputs import vae_reference

IMAGE = os.path.join(REPO, "guides", "images", "shapes.png")
SIZE = (240, 320)  # height, width of IMAGE
CIRCLE = (30.0, 60.0, 130.0, 160.0)
SQUARE = (180.0, 50.0, 290.0, 160.0)
CODES = tuple(range(20, 36))
EXAMPLES = {
    "caption en": "a red circle",
    "answer en what color is the square?": "blue",
    "ocr": "no text",
    "detect circle": encoding.detection_answer([("circle", CIRCLE)], SIZE),
    "segment square": encoding.segmentation_answer(
        [("square", SQUARE, CODES)], SIZE
    ),
}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The tiny preset taught the answers above for IMAGE, saved as a preset."""
    keras.utils.set_random_seed(0)  # Before any tokenizer resource exists.
    causal_lm = kp.PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.preprocessor.sequence_length = 40
    causal_lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    causal_lm.fit(
        x={
            "images": [IMAGE] * len(EXAMPLES),
            "prompts": list(EXAMPLES),
            "responses": list(EXAMPLES.values()),
        },
        batch_size=len(EXAMPLES),
        epochs=100,
        verbose=0,
    )
    preset = os.path.join(tmp_path_factory.mktemp("tuned"), "preset")
    causal_lm.save_to_preset(preset)
    return causal_lm, preset


def test_text_tasks(tuned):
    causal_lm, _ = tuned
    caption = causal_lm.caption(IMAGE)
    assert caption == kp.Answer("caption en", "a red circle")
    answers = causal_lm.answer([IMAGE, IMAGE], "what color is the square?")
    assert [a.text for a in answers] == ["blue", "blue"]
    assert causal_lm.ocr([IMAGE])[0].text == "no text"
    with pytest.raises(ValueError, match="questions"):
        causal_lm.answer([IMAGE, IMAGE], ["a?", "b?", "c?"])


def test_detect_returns_boxes_in_original_pixels(tuned):
    causal_lm, _ = tuned
    (detection,) = causal_lm.detect(IMAGE, "circle")
    assert detection.label == "circle"
    tolerance = np.array([320, 240, 320, 240]) / 1024
    assert (np.abs(np.array(detection.box) - CIRCLE) <= tolerance).all()
    # A bigger copy of the same picture: the box scales with it.
    big = np.asarray(Image.open(IMAGE).convert("RGB").resize((640, 480)))
    (detection,) = causal_lm.detect([big], ["circle"])[0]
    assert (np.abs(np.array(detection.box) - 2 * np.array(CIRCLE)) <= 2 * tolerance).all()


def test_segment_with_a_decoder(tuned):
    causal_lm, _ = tuned
    decoder = kp.MaskDecoder.from_vae_checkpoint(
        vae_reference.random_checkpoint(embedding_dim=8)
    )
    (segmentation,) = causal_lm.segment(IMAGE, "square", decoder)
    assert segmentation.label == "square"
    assert segmentation.codes == CODES
    assert segmentation.mask.shape == SIZE
    x_min, y_min, x_max, y_max = (int(round(v)) for v in segmentation.box)
    assert not segmentation.mask[:, : x_min - 1].any()
    assert not segmentation.mask[: y_min - 1].any()


def test_drawing_marks_the_box_and_the_mask(tmp_path):
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    segmentation = kp.Segmentation("x", (5.0, 5.0, 40.0, 30.0), (0,) * 16, mask)
    path = os.path.join(tmp_path, "drawn.png")
    kp.draw_results(np.zeros((40, 60, 3), "uint8"), [segmentation], path)
    pixels = np.asarray(Image.open(path))
    colour = np.array(kp.outputs.drawing.PALETTE[0])
    np.testing.assert_array_equal(pixels[20, 5], colour)  # left edge
    np.testing.assert_array_equal(pixels[15, 20], colour // 2)  # mask tint
    np.testing.assert_array_equal(pixels[35, 50], [0, 0, 0])  # untouched


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, "-m", "keras_paligemma", *args],
        capture_output=True, text=True, env=env, cwd=REPO,
    )


def test_cli_detect_draws_the_parsed_box(tuned, tmp_path):
    _, preset = tuned
    output = os.path.join(tmp_path, "annotated.png")
    result = run_cli(
        "detect", "--preset", preset, "--image", IMAGE,
        "--objects", "circle", "--output", output, "--backend", BACKEND,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'circle' at" in result.stdout
    (detection,) = kp.parse_detections(EXAMPLES["detect circle"], SIZE)
    x_min, y_min, x_max, y_max = (int(round(v)) for v in detection.box)
    pixels = np.asarray(Image.open(output).convert("RGB"))
    colour = np.array(kp.outputs.drawing.PALETTE[0])
    middle = (y_min + y_max) // 2
    np.testing.assert_array_equal(pixels[middle, x_min], colour)
    np.testing.assert_array_equal(pixels[middle, x_max - 1], colour)
    assert not (pixels[middle, x_min - 3] == colour).all()


def test_cli_errors_name_the_bad_argument(tmp_path):
    result = run_cli(
        "detect", "--preset", TINY_PRESET, "--image",
        os.path.join(tmp_path, "missing.png"), "--objects", "cat",
    )
    assert result.returncode != 0
    assert "--image" in result.stderr and "no such file" in result.stderr
    not_image = os.path.join(tmp_path, "notes.png")
    with open(not_image, "w") as f:
        f.write("not a png")
    result = run_cli(
        "generate", "--preset", TINY_PRESET, "--image", not_image,
        "--prompt", "ocr", "--backend", BACKEND,
    )
    assert result.returncode != 0
    assert "not an image file" in result.stderr
