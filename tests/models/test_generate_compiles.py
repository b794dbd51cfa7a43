"""`generate()` compiles once per prompt bucket and prefills only the bucket."""

import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_paligemma.models.generate_compile import prompt_bucket

SHORT_PROMPTS = [
    ["ocr", "caption en"],
    ["answer en what color is the square?", "ocr"],
    ["caption es", "answer en is there a red circle in the picture?"],
]
# Over 32 tokens: the next bucket.
LONG_PROMPTS = [
    ["answer en is the square to the left of the red circle or the blue one?",
     "ocr"],
    ["detect cat ; dog ; car ; tree ; bird ; house", "caption en"],
]


def some_images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 48, 3), dtype="uint8") for _ in range(count)]


def longest_prompt(causal_lm, prompts, max_length):
    x = causal_lm.preprocessor.generate_preprocess(
        {"images": some_images(len(prompts)), "prompts": prompts},
        sequence_length=max_length,
    )
    return int(ops.convert_to_numpy(x["padding_mask"]).sum(axis=1).max())


def count_traces(causal_lm):
    """Count the calls of `generate_step`: once per trace when compiled."""
    traces = []
    step = causal_lm.generate_step

    def counting_step(inputs, stop_token_ids=None):
        traces.append(inputs.get("prefill_length"))
        return step(inputs, stop_token_ids=stop_token_ids)

    causal_lm.generate_step = counting_step
    causal_lm.generate_function = None
    return traces


def test_prompt_bucket_is_a_power_of_two_capped_at_the_buffer():
    assert [prompt_bucket(n, 256) for n in (1, 12, 32, 33, 64, 65)] == [
        32, 32, 32, 64, 64, 128,
    ]
    assert prompt_bucket(20, 24) == 24
    assert prompt_bucket(100, 120) == 120


@pytest.mark.skipif(
    BACKEND == "torch",
    reason="generate runs eagerly on torch: nothing is traced or compiled",
)
def test_new_prompt_lengths_inside_a_bucket_do_not_recompile(tiny_causal_lm):
    max_length = 80
    short = {longest_prompt(tiny_causal_lm, p, max_length) for p in SHORT_PROMPTS}
    long = {longest_prompt(tiny_causal_lm, p, max_length) for p in LONG_PROMPTS}
    assert len(short) == len(SHORT_PROMPTS) and max(short) <= 32
    assert len(long) == len(LONG_PROMPTS) and 32 < min(long) and max(long) <= 64
    traces = count_traces(tiny_causal_lm)
    for prompts in SHORT_PROMPTS:
        tiny_causal_lm.generate(
            {"images": some_images(2), "prompts": prompts}, max_length=max_length
        )
    assert traces == [32]
    for prompts in LONG_PROMPTS:
        tiny_causal_lm.generate(
            {"images": some_images(2), "prompts": prompts}, max_length=max_length
        )
    assert traces == [32, 64]


def test_bucketed_prefill_gives_the_tokens_of_a_full_prefill(tiny_causal_lm):
    # Random norm scales: the tiny preset alone answers "\n" to everything.
    rng = np.random.default_rng(2)
    for variable in tiny_causal_lm.backbone.weights:
        if variable.path.endswith("scale"):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    preprocessor = tiny_causal_lm.preprocessor
    prompts = SHORT_PROMPTS[1] + LONG_PROMPTS[0][:1]
    x = preprocessor.generate_preprocess(
        {"images": some_images(3, seed=1), "prompts": prompts},
        sequence_length=72,
    )
    x = {key: ops.convert_to_numpy(value) for key, value in x.items()}
    tiny_causal_lm.preprocessor = None
    traces = count_traces(tiny_causal_lm)
    bucketed = tiny_causal_lm.generate(x, stop_token_ids=None)
    assert traces == [64]
    full = tiny_causal_lm.generate_step(x, stop_token_ids=None)
    assert traces[-1] is None
    for key in ("token_ids", "padding_mask"):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(bucketed[key]),
            ops.convert_to_numpy(full[key]),
        )
    lengths = x["padding_mask"].sum(axis=1)
    budget = 72 - lengths.max()
    answers = {
        tuple(row[n : n + budget])
        for row, n in zip(ops.convert_to_numpy(full["token_ids"]), lengths)
    }
    assert len(answers) > 1, "degenerate answers cannot show a difference"
