import os

import numpy as np
import pytest
from keras import ops
from PIL import Image

from keras_paligemma import PaliGemmaCausalLMPreprocessor
from keras_paligemma import PaliGemmaImageConverter
from keras_paligemma import PaliGemmaTokenizer


@pytest.fixture
def preprocessor(tiny_preset):
    return PaliGemmaCausalLMPreprocessor.from_preset(
        tiny_preset, sequence_length=16
    )


def as_numpy(x):
    return {k: ops.convert_to_numpy(v) for k, v in x.items()}


def test_tokenizer_keeps_location_and_segmentation_tokens(tiny_preset):
    tokenizer = PaliGemmaTokenizer.from_preset(tiny_preset)
    ids = [int(i) for i in tokenizer("<loc0012><seg127> cat")]
    pieces = [tokenizer.id_to_token(i) for i in ids[:2]]
    assert pieces == ["<loc0012>", "<seg127>"]
    assert tokenizer.token_to_id("<pad>") == 0
    assert tokenizer.token_to_id("<eos>") == 1
    assert tokenizer.token_to_id("<bos>") == 2
    assert tokenizer.detokenize(ids) == "<loc0012><seg127> cat"


@pytest.mark.parametrize("prompt", ["caption en", "caption en\n"])
def test_newline_is_added_once(preprocessor, prompt):
    tokenizer = preprocessor.tokenizer
    newline = tokenizer.token_to_id("\n")
    x, y, weights = preprocessor(
        {
            "images": np.zeros((1, 30, 40, 3), "uint8"),
            "prompts": [prompt],
            "responses": ["a cat"],
        }
    )
    x, y, weights = as_numpy(x), ops.convert_to_numpy(y), ops.convert_to_numpy(weights)
    prompt_ids = [int(i) for i in tokenizer("caption en")]
    answer_ids = [int(i) for i in tokenizer("a cat")]
    expected = [2] + prompt_ids + [newline] + answer_ids + [1]
    n = len(expected)
    np.testing.assert_array_equal(x["token_ids"][0, :n], expected)
    assert (x["token_ids"][0, n:] == 0).all()
    np.testing.assert_array_equal(x["padding_mask"][0], np.arange(16) < n)
    prefix = len(prompt_ids) + 2
    np.testing.assert_array_equal(
        x["response_mask"][0], (np.arange(16) >= prefix) & (np.arange(16) < n)
    )
    # Labels are the next tokens; the loss covers the answer and <eos> only.
    np.testing.assert_array_equal(y[0, : n - 1], expected[1:])
    np.testing.assert_array_equal(
        weights[0], (np.arange(16) >= prefix - 1) & (np.arange(16) < n - 1)
    )


def test_generate_preprocess_strings_and_tensor_prompts(preprocessor):
    import tensorflow as tf

    images = np.zeros((2, 30, 40, 3), "uint8")
    plain = as_numpy(
        preprocessor.generate_preprocess(
            {"images": images, "prompts": ["ocr", "caption en\n"]}
        )
    )
    tensor = as_numpy(
        preprocessor.generate_preprocess(
            {"images": images, "prompts": tf.constant(["ocr\n", "caption en"])}
        )
    )
    np.testing.assert_array_equal(plain["token_ids"], tensor["token_ids"])
    newline = preprocessor.tokenizer.token_to_id("\n")
    lengths = plain["padding_mask"].sum(1)
    assert plain["token_ids"][0, lengths[0] - 1] == newline
    assert plain["token_ids"][0, lengths[0] - 2] != newline


def test_preprocessor_in_tf_data(preprocessor):
    import tensorflow as tf

    data = tf.data.Dataset.from_tensor_slices(
        {
            "images": np.zeros((2, 30, 40, 3), "float32"),
            "prompts": ["caption en", "ocr\n"],
            "responses": ["a cat", "text"],
        }
    ).batch(2).map(preprocessor)
    x, y, weights = next(iter(data))
    assert tuple(x["images"].shape) == (2, 56, 56, 3)
    assert tuple(x["token_ids"].shape) == (2, 16)


def test_missing_inputs_are_named(preprocessor):
    with pytest.raises(ValueError, match="responses"):
        preprocessor({"images": np.zeros((1, 8, 8, 3)), "prompts": ["ocr"]})
    with pytest.raises(TypeError, match="dict"):
        preprocessor.generate_preprocess("ocr")


def test_image_converter_resizes_whole_image_without_crop():
    converter = PaliGemmaImageConverter(image_size=(4, 4))
    image = np.zeros((8, 16, 3), "uint8")
    image[:, :4] = 255  # the left quarter is white: a centre crop drops it
    out = ops.convert_to_numpy(converter(image))
    assert out.shape == (4, 4, 3)
    np.testing.assert_allclose(out[:, 0], 1.0)
    np.testing.assert_allclose(out[:, 2:], -1.0)


def test_image_converter_accepts_every_kind_of_image(tmp_path):
    converter = PaliGemmaImageConverter(image_size=(8, 8))
    path = os.path.join(tmp_path, "red.png")
    Image.new("RGB", (20, 10), (255, 0, 0)).save(path)
    images = [
        path,
        Image.new("RGBA", (5, 7), (255, 0, 0, 0)),
        Image.new("L", (9, 9), 255),
        np.full((6, 6), 255, "uint8"),
        np.full((6, 4, 1), 255.0, "float32"),
        np.concatenate(
            [np.full((3, 3, 3), [255, 0, 0], "uint8"), np.zeros((3, 3, 1), "uint8")],
            axis=-1,
        ),
    ]
    out = ops.convert_to_numpy(converter(images))
    assert out.shape == (6, 8, 8, 3)
    red = np.array([1.0, -1.0, -1.0])
    for i in (0, 1, 5):
        np.testing.assert_allclose(out[i], np.broadcast_to(red, (8, 8, 3)), atol=1e-5)
    for i in (2, 3, 4):
        np.testing.assert_allclose(out[i], 1.0, atol=1e-5)


def test_image_converter_errors_name_the_argument(tmp_path):
    converter = PaliGemmaImageConverter(image_size=(8, 8))
    with pytest.raises(FileNotFoundError, match="images"):
        converter(os.path.join(tmp_path, "missing.png"))
    not_image = os.path.join(tmp_path, "notes.txt")
    with open(not_image, "w") as f:
        f.write("hello")
    with pytest.raises(ValueError, match="images"):
        converter(not_image)
    with pytest.raises(ValueError, match="shape"):
        converter(np.zeros((4, 4, 5)))
    with pytest.raises(TypeError, match="images"):
        converter([np.array([["a", "b"]])])


def test_image_converter_reads_path_tensors_like_paths(tmp_path):
    import tensorflow as tf

    converter = PaliGemmaImageConverter(image_size=(8, 8))
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(20, 12), (9, 30)]):
        path = os.path.join(tmp_path, f"{i}.png")
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype="uint8")).save(path)
        paths.append(path)
    from_python = ops.convert_to_numpy(converter(paths))
    from_graph = tf.data.Dataset.from_tensor_slices(paths).batch(2).map(converter)
    np.testing.assert_allclose(next(iter(from_graph)).numpy(), from_python, atol=1e-5)
