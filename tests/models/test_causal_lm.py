import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_paligemma import PaliGemmaCausalLM

PROMPTS = ["answer en what color is the square?", "ocr", "caption en"]


def some_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (30 + 10 * i, 40, 3), dtype="uint8")
        for i in range(count)
    ]


def test_generate_returns_a_string_or_a_list(tiny_causal_lm):
    image = some_images(1)[0]
    single = tiny_causal_lm.generate(
        {"images": image, "prompts": "caption en"}, max_length=24
    )
    assert isinstance(single, str) and single.startswith("caption en\n")
    batch = tiny_causal_lm.generate(
        {"images": [image, image], "prompts": ["caption en", "ocr"]},
        max_length=24,
    )
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0] == single[: len(batch[0])]
    stripped = tiny_causal_lm.generate(
        {"images": image, "prompts": "caption en"},
        max_length=24,
        strip_prompt=True,
    )
    assert single == "caption en\n" + stripped


def test_batch_of_ragged_prompts_equals_one_by_one(tiny_causal_lm):
    images = some_images(3)
    length = 40
    preprocessor = tiny_causal_lm.preprocessor
    longest = max(
        int(ops.convert_to_numpy(preprocessor.generate_preprocess(
            {"images": image, "prompts": prompt}, sequence_length=length
        )["padding_mask"]).sum())
        for image, prompt in zip(images, PROMPTS)
    )
    tiny_causal_lm.preprocessor = None
    tokens = []
    for image, prompt in zip(images, PROMPTS):
        x = preprocessor.generate_preprocess(
            {"images": [image], "prompts": [prompt]}, sequence_length=length
        )
        tokens.append(x)
    batch = {
        key: np.concatenate([ops.convert_to_numpy(t[key]) for t in tokens])
        for key in ("images", "token_ids", "padding_mask")
    }
    together = tiny_causal_lm.generate(batch, stop_token_ids=None)
    budget = length - longest
    for row, x in enumerate(tokens):
        x = {k: ops.convert_to_numpy(x[k]) for k in batch}
        alone = tiny_causal_lm.generate(x, stop_token_ids=None)
        n = int(x["padding_mask"].sum())
        got = ops.convert_to_numpy(together["token_ids"])[row, : n + budget]
        want = ops.convert_to_numpy(alone["token_ids"])[0, : n + budget]
        np.testing.assert_array_equal(got, want)


def test_generate_with_token_ids_stops_at_eos(tiny_causal_lm):
    x = tiny_causal_lm.preprocessor.generate_preprocess(
        {"images": some_images(2), "prompts": ["ocr", "caption en"]},
        sequence_length=24,
    )
    tiny_causal_lm.preprocessor = None
    x = {k: ops.convert_to_numpy(v) for k, v in x.items()}
    free = tiny_causal_lm.generate(x, stop_token_ids=None)
    first = ops.convert_to_numpy(free["token_ids"])[:, int(x["padding_mask"][0].sum())]
    # Stop on whatever the first answer token of row 0 is: row 0 ends there.
    stop = int(first[0])
    stopped = tiny_causal_lm.generate(x, stop_token_ids=(stop,))
    n = int(x["padding_mask"][0].sum())
    kept = ops.convert_to_numpy(stopped["padding_mask"])[0].astype(bool)
    np.testing.assert_array_equal(kept, np.arange(24) < n + 1)


@pytest.mark.skipif(
    BACKEND == "torch", reason="generate runs eagerly on torch: no tracing"
)
def test_no_retrace_for_new_prompt_lengths(tiny_causal_lm):
    traces = []
    step = tiny_causal_lm.generate_step

    def counting_step(inputs, stop_token_ids=None):
        traces.append(1)
        return step(inputs, stop_token_ids=stop_token_ids)

    tiny_causal_lm.generate_step = counting_step
    tiny_causal_lm.generate_function = None
    images = some_images(2)
    for prompts in (PROMPTS[:2], PROMPTS[1:], ["ocr", "ocr"]):
        tiny_causal_lm.generate(
            {"images": images, "prompts": prompts}, max_length=32
        )
    assert len(traces) == 1


def test_call_and_score_give_text_logits(tiny_causal_lm):
    x, y, weights = tiny_causal_lm.preprocessor(
        {"images": some_images(2), "prompts": ["ocr", "caption en"],
         "responses": ["a", "a red circle"]},
        sequence_length=20,
    )
    logits = ops.convert_to_numpy(tiny_causal_lm(x))
    vocabulary = tiny_causal_lm.backbone.vocabulary_size
    assert logits.shape == (2, 20, vocabulary)
    scored = ops.convert_to_numpy(tiny_causal_lm.score(
        x["images"], x["token_ids"], x["padding_mask"], x["response_mask"]
    ))
    np.testing.assert_allclose(scored, logits, atol=1e-5)
    losses = ops.convert_to_numpy(tiny_causal_lm.score(
        x["images"], x["token_ids"], x["padding_mask"], x["response_mask"],
        scoring_mode="loss", target_ids=y,
    ))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = ops.convert_to_numpy(y)
    expected = -np.take_along_axis(log_probs, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="target_ids"):
        tiny_causal_lm.score(
            x["images"], x["token_ids"], scoring_mode="loss"
        )


def test_fit_learns_answers_for_images(tiny_causal_lm):
    import keras

    red = np.zeros((40, 40, 3), "uint8")
    red[..., 0] = 255
    blue = np.zeros((40, 40, 3), "uint8")
    blue[..., 2] = 255
    data = {
        "images": np.stack([red, blue]),
        "prompts": ["caption en", "caption en"],
        "responses": ["a red circle", "a blue square"],
    }
    tiny_causal_lm.preprocessor.sequence_length = 16
    tiny_causal_lm.compile(optimizer=keras.optimizers.Adam(5e-3))
    history = tiny_causal_lm.fit(x=data, batch_size=2, epochs=60, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.1 * losses[0]
    evaluation = tiny_causal_lm.evaluate(x=data, batch_size=2, verbose=0)
    assert evaluation[0] == pytest.approx(losses[-1], rel=0.5, abs=0.05)
    questions = {"images": data["images"], "prompts": data["prompts"]}
    answers = tiny_causal_lm.generate(questions, strip_prompt=True)
    assert answers == ["a red circle", "a blue square"]


def test_responses_force_the_start_of_the_answer(tiny_causal_lm):
    x = {"images": some_images(1), "prompts": ["caption en"],
         "responses": ["a red"]}
    answer = tiny_causal_lm.generate(x, max_length=24)
    assert answer[0].startswith("caption en\na red")
    # keras-hub semantics: `strip_prompt` also strips the forced words.
    rest = tiny_causal_lm.generate(x, max_length=24, strip_prompt=True)
    assert answer[0] == "caption en\na red" + rest[0]


def test_keras_hub_samplers_are_accepted(tiny_causal_lm):
    import keras_hub

    x = {"images": some_images(2), "prompts": ["caption en", "ocr"]}
    greedy = tiny_causal_lm.generate(x, max_length=20)
    tiny_causal_lm.compile(sampler=keras_hub.samplers.TopKSampler(k=1))
    assert tiny_causal_lm.generate(x, max_length=20) == greedy


def test_samplers_that_reorder_the_cache_agree_with_greedy(tiny_causal_lm):
    """Beam and contrastive samplers copy and gather the per-layer cache.

    One beam is greedy; contrastive search without the degeneration
    penalty (`alpha=0`) picks the likeliest of its candidates: greedy too.
    Beam search with more beams must run and keep every row's prompt.
    """
    import keras_hub

    x = {"images": some_images(2), "prompts": ["caption en", "ocr"]}
    greedy = tiny_causal_lm.generate(x, max_length=20)
    for sampler in (
        keras_hub.samplers.BeamSampler(num_beams=1),
        keras_hub.samplers.ContrastiveSampler(k=2, alpha=0.0),
    ):
        tiny_causal_lm.compile(sampler=sampler)
        assert tiny_causal_lm.generate(x, max_length=20) == greedy
    tiny_causal_lm.compile(sampler=keras_hub.samplers.BeamSampler(num_beams=3))
    beams = tiny_causal_lm.generate(x, max_length=20)
    assert beams[0].startswith("caption en\n") and beams[1].startswith("ocr\n")
    tiny_causal_lm.compile(sampler="greedy")
