"""Parity with HF transformers' PaliGemma on the same random weights."""

import tempfile

import numpy as np
import pytest
from keras import ops

import transformers_oracle as oracle
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.checkpoints.transformers import load_backbone

# (generation, sliding window): Gemma; Gemma 2 with a window shorter than
# the prefix (so it bites during prefill and decode) and one longer.
CASES = [(1, None), (2, 3), (2, 40)]
IDS = ["paligemma1", "paligemma2-window3", "paligemma2-window40"]


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def models(request):
    generation, window = request.param
    reference = oracle.tiny_model(generation, sliding_window=window)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        backbone = load_backbone(directory)
    return reference, backbone


def text_logits(backbone, inputs):
    hidden = backbone(inputs)
    return ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


def images(batch, seed=0):
    rng = np.random.default_rng(seed)
    size = oracle.IMAGE_SIZE
    return rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")


def test_logits_match_over_image_prompt_and_answer(models):
    reference, backbone = models
    rng = np.random.default_rng(1)
    token_ids = rng.integers(3, 1100, (2, 12)).astype("int32")
    token_ids[:, 0] = 2
    padding_mask = np.ones((2, 12), "int32")
    padding_mask[1, 9:] = 0
    response_mask = np.zeros((2, 12), "int32")
    response_mask[:, 6:] = 1
    response_mask *= padding_mask
    x = images(2)
    expected = oracle.logits(
        reference, x, token_ids, padding_mask, response_mask
    )
    got = text_logits(
        backbone,
        {
            "images": x,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": response_mask,
        },
    )
    valid = padding_mask.astype(bool)
    difference = np.abs(got - expected)[valid].max()
    print(f"max |logit difference| = {difference:.2e}")
    assert difference < 1e-4


def test_greedy_generation_matches_for_a_ragged_batch(models):
    reference, backbone = models
    prompts = [[2, 17, 250, 31, 9, 400, 77, 108], [2, 5, 108], [2, 900, 8, 108]]
    length = 20
    budget = length - max(len(p) for p in prompts)
    x = images(len(prompts), seed=2)
    expected = oracle.greedy(reference, x, prompts, max_new_tokens=budget)
    assert len({tuple(a) for a in expected}) > 1, "degenerate oracle"

    causal_lm = PaliGemmaCausalLM(backbone, preprocessor=None)
    token_ids = np.zeros((len(prompts), length), "int32")
    for row, prompt in enumerate(prompts):
        token_ids[row, : len(prompt)] = prompt
    out = causal_lm.generate(
        {"images": x, "token_ids": token_ids, "padding_mask": token_ids != 0},
        stop_token_ids=(1,),
    )
    answers = []
    for row, prompt in enumerate(prompts):
        ids = ops.convert_to_numpy(out["token_ids"])[row]
        kept = ops.convert_to_numpy(out["padding_mask"])[row].astype(bool)
        answer = ids[kept][len(prompt) :].tolist()
        np.testing.assert_array_equal(ids[: len(prompt)], prompt)
        answers.append(answer[: answer.index(1)] if 1 in answer else answer)
    assert answers == expected


def test_two_images_per_example_match_transformers():
    reference = oracle.tiny_model(2, sliding_window=6)
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory)
        backbone = load_backbone(directory, num_images=2)
    rng = np.random.default_rng(3)
    size = oracle.IMAGE_SIZE
    x = rng.uniform(-1, 1, (2, 2, size, size, 3)).astype("float32")
    token_ids = rng.integers(3, 1100, (2, 10)).astype("int32")
    padding_mask = np.ones((2, 10), "int32")
    padding_mask[0, 8:] = 0
    response_mask = (np.arange(10) >= 5).astype("int32")[None].repeat(2, 0)
    response_mask *= padding_mask
    expected = oracle.logits(reference, x, token_ids, padding_mask, response_mask)
    inputs = {
        "images": x,
        "image_mask": np.ones((2, 2), "int32"),
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "response_mask": response_mask,
    }
    got = text_logits(backbone, inputs)
    valid = padding_mask.astype(bool)
    difference = np.abs(got - expected)[valid].max()
    print(f"two images: max |logit difference| = {difference:.2e}")
    assert difference < 1e-4
    # The order of the images matters (each keeps its own block of tokens).
    swapped = text_logits(backbone, {**inputs, "images": x[:, ::-1]})
    assert np.abs(swapped - got)[valid].max() > 1e-3


def test_from_preset_reads_a_transformers_directory(tmp_path):
    import shutil

    from conftest import TINY_PRESET
    from keras_paligemma import PaliGemmaBackbone

    reference = oracle.tiny_model(2, sliding_window=64, vocabulary_size=1472)
    directory = str(tmp_path / "hf")
    reference.save_pretrained(directory)
    backbone = PaliGemmaBackbone.from_preset(directory)
    assert backbone.vocabulary_size == 1472
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        PaliGemmaCausalLM.from_preset(directory)
    shutil.copy(
        f"{TINY_PRESET}/assets/tokenizer/vocabulary.spm",
        f"{directory}/tokenizer.model",
    )
    causal_lm = PaliGemmaCausalLM.from_preset(directory)
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype="uint8")
    x = causal_lm.preprocessor.generate_preprocess(
        {"images": [image], "prompts": ["caption en"]}, sequence_length=20
    )
    n = int(ops.convert_to_numpy(x["padding_mask"]).sum())
    prompt = ops.convert_to_numpy(x["token_ids"])[0, :n].tolist()
    pixels = ops.convert_to_numpy(x["images"])
    (expected,) = oracle.greedy(reference, pixels, [prompt], max_new_tokens=20 - n)
    tokenizer = causal_lm.preprocessor.tokenizer
    answer = causal_lm.generate(
        {"images": image, "prompts": "caption en"}, max_length=20, strip_prompt=True
    )
    assert answer == tokenizer.detokenize(expected)


@pytest.mark.parametrize("generation", [1, 2])
def test_export_back_to_transformers(generation, tmp_path):
    import transformers

    from keras_paligemma.checkpoints.transformers_export import export_transformers

    reference = oracle.tiny_model(generation, sliding_window=3)
    source = str(tmp_path / "source")
    reference.save_pretrained(source)
    backbone = load_backbone(source)
    # Change every weight, as fine-tuning would, so a stale copy shows.
    rng = np.random.default_rng(5)
    for variable in backbone.weights:
        noise = rng.normal(0, 0.02, variable.shape).astype("float32")
        variable.assign(ops.convert_to_numpy(variable) + noise)
    target = str(tmp_path / "exported")
    export_transformers(backbone, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_transformers(backbone, target)
    exported = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        target, attn_implementation="eager"
    ).eval()
    rng = np.random.default_rng(6)
    token_ids = rng.integers(3, 1100, (2, 11)).astype("int32")
    padding_mask = np.ones((2, 11), "int32")
    padding_mask[1, 8:] = 0
    response_mask = (np.arange(11) >= 6).astype("int32")[None].repeat(2, 0) * padding_mask
    x = images(2, seed=7)
    expected = oracle.logits(exported, x, token_ids, padding_mask, response_mask)
    got = text_logits(
        backbone,
        {"images": x, "token_ids": token_ids, "padding_mask": padding_mask,
         "response_mask": response_mask},
    )
    valid = padding_mask.astype(bool)
    assert np.abs(got - expected)[valid].max() < 1e-4
    # And the round trip back into our format is exact.
    again = load_backbone(target)
    for a, b in zip(again.weights, backbone.weights):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_truncated_safetensors_names_the_file(tmp_path):
    reference = oracle.tiny_model(1)
    directory = str(tmp_path / "hf")
    reference.save_pretrained(directory)
    path = f"{directory}/model.safetensors"
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_backbone(directory)


def test_full_attention_gemma2_round_trips_through_transformers(tmp_path):
    from conftest import TINY_PRESET
    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma.checkpoints.transformers_export import export_transformers

    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET)
    assert backbone.sliding_window is None and backbone.use_post_norms
    target = str(tmp_path / "hf")
    export_transformers(backbone, target)
    again = load_backbone(target)
    assert again.get_config() == {**backbone.get_config(), "name": again.name}
    by_path = {v.path: ops.convert_to_numpy(v) for v in backbone.weights}
    for variable in again.weights:
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), by_path[variable.path])
