"""SavedModel export: served in a fresh process, same answers as generate()."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image

from conftest import REPO
import keras_paligemma as kp

MAX_LENGTH = 32
PROMPTS = ["caption en", "answer en what color is the square?", "ocr"]
ANSWERS = ["a red circle", "blue", "no text"]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, kind) in enumerate(
        [((50, 70), "JPEG"), ((33, 33), "PNG"), ((90, 40), "PNG")]
    ):
        pixels = rng.integers(0, 256, size + (3,), dtype="uint8")
        path = os.path.join(directory, f"image_{i}.{kind.lower()}")
        mode = "RGBA" if i == 2 else "RGB"
        image = Image.fromarray(pixels).convert(mode)
        image.save(path, kind, **({"quality": 95} if kind == "JPEG" else {}))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def trained(image_files, tmp_path_factory):
    """The tiny preset, fine-tuned a little on this backend, and its export."""
    causal_lm = kp.PaliGemmaCausalLM.from_preset(
        os.path.join(REPO, "presets", "pali_gemma_tiny_random")
    )
    causal_lm.preprocessor.sequence_length = MAX_LENGTH
    causal_lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    causal_lm.fit(
        x={"images": image_files, "prompts": PROMPTS, "responses": ANSWERS},
        batch_size=3,
        epochs=30,
        verbose=0,
    )
    path = os.path.join(tmp_path_factory.mktemp("export"), "paligemma")
    kp.export_saved_model(causal_lm, path, max_length=MAX_LENGTH)
    return causal_lm, path


def serve(path, images, prompts):
    """Run tools/serve_check.py in a fresh process."""
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "serve_check.py"), path,
         "--image", *images, "--prompt", *prompts],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_served_answers_equal_generate(trained, image_files):
    causal_lm, path = trained
    served = serve(path, image_files, PROMPTS)
    expected = causal_lm.generate(
        {"images": image_files, "prompts": PROMPTS}, max_length=MAX_LENGTH
    )
    assert served["text"] == expected
    # The fine-tuning took: the answers are the trained ones.
    assert [t.split("\n", 1)[1] for t in served["text"]] == ANSWERS
    tokens = np.array(served["token_ids"])
    assert tokens.shape == (3, MAX_LENGTH)
    tokenizer = causal_lm.preprocessor.tokenizer
    for row, text in zip(tokens, expected):
        ids = [int(i) for i in row if i > 2]
        assert tokenizer.detokenize(ids) == text


def test_export_refuses_existing_directory(trained, tmp_path):
    causal_lm, _ = trained
    target = os.path.join(tmp_path, "taken")
    os.makedirs(target)
    with open(os.path.join(target, "keep.txt"), "w") as f:
        f.write("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        kp.export_saved_model(causal_lm, target)
    assert os.listdir(target) == ["keep.txt"]


def test_export_size_is_the_weights_size(trained):
    from tensorflow.core.protobuf import saved_model_pb2

    causal_lm, path = trained
    weights = sum(
        int(np.prod(w.shape)) * 4 for w in causal_lm.backbone.weights
    )
    variables = os.path.join(path, "variables")
    stored = sum(
        os.path.getsize(os.path.join(variables, f))
        for f in os.listdir(variables)
    )
    print(f"weights {weights} B, variables {stored} B, ratio {stored / weights:.3f}")
    assert weights <= stored <= 1.05 * weights
    # No weight is duplicated into the graph as a constant.
    graph = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        graph.ParseFromString(f.read())
    nodes = list(graph.meta_graphs[0].graph_def.node)
    for function in graph.meta_graphs[0].graph_def.library.function:
        nodes += list(function.node_def)
    largest_weight = max(
        int(np.prod(w.shape)) * 4 for w in causal_lm.backbone.weights
    )
    largest_constant = max(
        (n.ByteSize(), n.name) for n in nodes if n.op == "Const"
    )
    assert largest_constant[0] < largest_weight / 2, largest_constant


def test_export_needs_a_preprocessor_and_a_valid_length(tmp_path):
    causal_lm = kp.PaliGemmaCausalLM.from_preset(
        os.path.join(REPO, "presets", "pali_gemma_tiny_random")
    )
    with pytest.raises(ValueError, match="max_length"):
        kp.export_saved_model(causal_lm, os.path.join(tmp_path, "a"), max_length=1)
    causal_lm.preprocessor = None
    with pytest.raises(ValueError, match="preprocessor"):
        kp.export_saved_model(causal_lm, os.path.join(tmp_path, "b"))


def test_backbone_export_matches_the_backbone(trained, tmp_path):
    import tensorflow as tf

    causal_lm, _ = trained
    backbone = causal_lm.backbone
    path = os.path.join(tmp_path, "backbone")
    kp.export_backbone(backbone, path)
    rng = np.random.default_rng(0)
    inputs = {
        "images": rng.uniform(-1, 1, (2, 56, 56, 3)).astype("float32"),
        "token_ids": rng.integers(3, 300, (2, 9)).astype("int32"),
        "padding_mask": np.ones((2, 9), "int32"),
        "response_mask": (np.arange(9) >= 5).astype("int32")[None].repeat(2, 0),
    }
    inputs["padding_mask"][1, 7:] = 0
    loaded = tf.saved_model.load(path)
    served = loaded.serve({k: tf.constant(v) for k, v in inputs.items()})
    expected = ops.convert_to_numpy(backbone(inputs))
    valid = inputs["padding_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(served)[valid], expected[valid], atol=1e-5
    )
