"""The shapes task: its data, a CI-sized fine-tuning run, the shipped preset."""

import doctest
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from conftest import TINY_PRESET

sys.path.insert(0, os.path.join(REPO, "tools"))

import plot_loss  # noqa: E402
import shapes_task  # noqa: E402
import train_shapes  # noqa: E402

from keras_paligemma import PaliGemmaCausalLM  # noqa: E402
from keras_paligemma.outputs.detection import parse_detections  # noqa: E402

SHAPES_PRESET = os.path.join(REPO, "presets", "pali_gemma_shapes")
DEMO_IMAGE = os.path.join(REPO, "guides", "images", "shapes_demo.png")
DEMO_OBJECTS = [("circle", "red", 0), ("square", "blue", 3)]


def test_examples_are_self_consistent():
    data = shapes_task.make_dataset(30, seed=0)
    assert data["images"].shape == (30, 112, 112, 3)
    assert data["tasks"][:3] == ["caption", "color", "detect"]
    for i, task in enumerate(data["tasks"]):
        objects, response = data["objects"][i], data["responses"][i]
        if task == "caption":
            assert response == shapes_task.caption(objects)
        elif task == "color":
            shape = data["prompts"][i].split()[-1].rstrip("?")
            assert response == next(c for s, c, _ in objects if s == shape)
        else:
            shape = response.split()[-1]
            cell = next(c for s, _, c in objects if s == shape)
            (found,) = parse_detections(response, (112, 112))
            assert shapes_task.box_iou(found.box, shapes_task.cell_box(cell)) > 0.98
    # The drawn colour is where the box says.
    image = shapes_task.draw([("square", "blue", 3)])
    x0, y0, x1, y1 = (int(v) for v in shapes_task.cell_box(3))
    assert tuple(image[(y0 + y1) // 2, (x0 + x1) // 2]) == shapes_task.COLORS["blue"]
    assert tuple(image[5, 5]) == (255, 255, 255)
    with pytest.raises(ValueError, match="`task` must be one of"):
        shapes_task.make_example(np.random.default_rng(0), "count")


@pytest.mark.parametrize("module", [shapes_task, plot_loss])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_score_counts_exact_matches_and_box_overlap():
    data = shapes_task.make_dataset(6, seed=3)
    perfect = shapes_task.score(data, data["responses"])
    assert perfect == {"caption": 1.0, "color": 1.0, "detect": pytest.approx(1.0, abs=0.02)}
    wrong = shapes_task.score(data, ["a purple star"] * 6)
    assert wrong == {"caption": 0.0, "color": 0.0, "detect": 0.0}


def test_fine_tuning_the_tiny_model_learns_the_task():
    held_out = shapes_task.make_dataset(48, seed=12_345)
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    before = train_shapes.evaluate(causal_lm, held_out)
    assert before["caption"] < 0.1 and before["color"] < 0.5
    assert before["detect"] < 0.2

    losses = train_shapes.train(causal_lm, steps=600, batch_size=64, seed=0)
    after = train_shapes.evaluate(causal_lm, held_out)
    print("shapes held-out before", before, "after", after)
    assert np.mean(losses[-20:]) < 0.2 * np.mean(losses[:20])
    assert after["caption"] >= 0.9
    assert after["color"] >= 0.9
    assert after["detect"] >= 0.5


def test_shipped_preset_answers_the_readme_demo():
    result = subprocess.run(
        [
            sys.executable, "-m", "keras_paligemma", "generate",
            "--preset", SHAPES_PRESET,
            "--image", "guides/images/shapes_demo.png",
            "--prompt", "caption en",
        ],
        capture_output=True, text=True, cwd=REPO, timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == (
        "guides/images/shapes_demo.png: 'a red circle and a blue square'"
    )


def test_shipped_preset_detects_and_answers_on_held_out_images():
    causal_lm = PaliGemmaCausalLM.from_preset(SHAPES_PRESET)
    held_out = shapes_task.make_dataset(96, seed=54_321)
    metrics = train_shapes.evaluate(causal_lm, held_out)
    assert metrics["caption"] >= 0.9 and metrics["color"] >= 0.9
    assert metrics["detect"] >= 0.5

    (square,) = causal_lm.detect(DEMO_IMAGE, ["square"])
    assert square.label == "square"
    expected = shapes_task.cell_box(3, image_size=448)
    assert shapes_task.box_iou(square.box, expected) >= 0.5
    answer = causal_lm.answer(DEMO_IMAGE, "what color is the circle?")
    assert answer.text == "red"
