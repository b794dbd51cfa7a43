"""Sliding-window layers decode from a ring of the last `window` positions."""

import keras_hub
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.layers.attention_mask import prefix_lm_attention_mask
from keras_paligemma.layers.attention_mask import window_ring_mask
from keras_paligemma.layers.window_cache import ring_columns
from keras_paligemma.layers.window_cache import ring_from_cache
from keras_paligemma.layers.window_cache import write_into_ring

TINY_GEMMA2 = dict(
    vocabulary_size=64, image_size=28, num_layers=3, num_query_heads=4,
    num_key_value_heads=2, hidden_dim=16, ffw_hidden_dim=32, head_dim=8,
    vit_num_heads=2, vit_hidden_dim=16, vit_num_layers=1,
    vit_intermediate_dim=32, use_post_norms=True,
    attention_logit_softcap=50.0, final_logit_softcap=30.0,
    query_pre_attn_scalar=12,
)


class FullCacheGreedy(keras_hub.samplers.GreedySampler):
    """Greedy through its own loop: the model then keeps full caches and
    decodes the last prompt token again (the path beam search takes)."""

    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs)


def test_ring_holds_the_window_and_the_mask_shows_exactly_it():
    # Row 0: positions 0..5; row 1 has padding at columns 2 and 3.
    positions = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 1, 1, 2, 3]], "int32")
    valid = np.array([[1] * 6, [1, 1, 0, 0, 1, 1]], bool)
    cache = np.arange(2 * 2 * 6, dtype="float32").reshape(2, 2, 6, 1, 1)
    window = 3
    taken = ring_columns(positions, np.array([5, 3]), window)
    ring = ops.convert_to_numpy(
        ring_from_cache(ops.convert_to_tensor(cache), taken))
    # Slot j holds the latest position q <= last with q % 3 == j.
    for row, columns in enumerate([[3, 4, 5], [5, 1, 4]]):
        np.testing.assert_array_equal(ring[row, :, :, 0, 0],
                                      cache[row, :, columns, 0, 0].T)
    # One decode step each: positions 6 and 4 go to slots 0 and 1.
    new = np.full((2, 2, 1, 1, 1), -1.0, "float32")
    slots = ops.convert_to_tensor(np.array([0, 1], "int32"))
    ring = ops.convert_to_numpy(write_into_ring(
        ops.convert_to_tensor(ring), ops.convert_to_tensor(new), slots))
    assert (ring[0, :, 0] == -1).all() and (ring[1, :, 1] == -1).all()
    assert (ring[0, :, 1:] != -1).all() and (ring[1, :, ::2] != -1).all()
    # The full rule over the same keys shows `window` of them to an answer
    # token; the ring mask shows every slot once the window is full, and
    # only the filled slots before.
    full = prefix_lm_attention_mask(
        valid[:1], np.array([[0, 0, 0, 0, 1, 1]]), positions[:1],
        query_start=5, query_length=1, sliding_window=window)
    assert int(ops.convert_to_numpy(full).sum()) == window
    mask = ops.convert_to_numpy(window_ring_mask(np.array([6, 1]), window))
    assert mask.tolist() == [[[True] * 3], [[True, True, False]]]


def causal_lm(window, seed=0):
    backbone = PaliGemmaBackbone(**TINY_GEMMA2, sliding_window=window)
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    return PaliGemmaCausalLM(backbone)


def ragged_inputs(batch_lengths, length):
    rng = np.random.default_rng(1)
    token_ids = np.zeros((len(batch_lengths), length), "int32")
    for row, n in enumerate(batch_lengths):
        token_ids[row, :n] = rng.integers(3, 64, n)
        token_ids[row, 0] = 2
    images = rng.uniform(-1, 1, (len(batch_lengths), 28, 28, 3))
    return {"images": images.astype("float32"), "token_ids": token_ids,
            "padding_mask": token_ids != 0}


def recorded_cache_slots(model, inputs, stop_token_ids=None):
    """Generate, recording every decode step's per-layer cache lengths."""
    seen = []
    decode = model.backbone.decode

    def recording(x, *args, **kwargs):
        out = decode(x, *args, **kwargs)
        if x.shape[1] == 1 and isinstance(out, tuple):
            seen.append([c.shape[2] for c in out[1]])
        return out

    model.backbone.decode = recording
    try:
        out = model.generate(inputs, stop_token_ids=stop_token_ids)
    finally:
        model.backbone.decode = decode
    kept = ops.convert_to_numpy(out["padding_mask"])
    return np.where(kept, ops.convert_to_numpy(out["token_ids"]), -1), seen


@pytest.mark.parametrize("window", [2, 5, 9, 40])
def test_ring_generation_equals_full_caches(window):
    """Windows shorter than a prompt, between the two prefixes (image +
    prompt: 7 and 11 tokens), and longer than everything (no ring): the
    same tokens as full caches."""
    model = causal_lm(window)
    # 4 image tokens; prompts of 3 and 7 tokens; 12 text columns.
    inputs = ragged_inputs([3, 7], 12)
    tokens, slots = recorded_cache_slots(model, inputs)
    model.compile(sampler=FullCacheGreedy())
    expected, full_slots = recorded_cache_slots(model, inputs)
    np.testing.assert_array_equal(tokens, expected)
    columns = model.backbone.num_image_tokens + 12
    assert {tuple(s) for s in full_slots} == {(columns,) * 3}
    ring = min(window, columns)
    assert {tuple(s) for s in slots} == {(ring, columns, ring)}
    # Each row alone starts with the tokens it got in the batch (alone, a
    # shorter prompt has a longer answer budget).
    model.compile(sampler="greedy")
    for row in range(2):
        alone = {k: v[row : row + 1] for k, v in inputs.items()}
        got, _ = recorded_cache_slots(model, alone)
        n = int((expected[row] >= 0).sum())
        np.testing.assert_array_equal(got[0, :n], expected[row, :n])


def test_first_answer_token_comes_from_the_prefill():
    """Greedy decodes one step fewer: the prefill gave the first token."""
    if BACKEND != "torch":
        pytest.skip("counts eager decode calls; XLA traces the step once")
    model = causal_lm(None)
    inputs = ragged_inputs([4], 10)
    _, steps = recorded_cache_slots(model, inputs)
    assert len(steps) == 10 - 4 - 1
    model.compile(sampler=FullCacheGreedy())
    _, steps = recorded_cache_slots(model, inputs)
    assert len(steps) == 10 - 4


def test_rings_with_forced_answers_and_stop_tokens():
    """Forced answer tokens in the prefill, and rows stopping early."""
    model = causal_lm(3)
    inputs = ragged_inputs([4, 8], 14)
    response_mask = np.zeros_like(inputs["token_ids"])
    response_mask[1, 6:8] = 1  # the last two prompt tokens of row 1
    inputs["response_mask"] = response_mask
    model.compile(sampler=FullCacheGreedy())
    expected, _ = recorded_cache_slots(model, inputs)
    stop = int(expected[0, 5])  # row 0's second answer token
    expected_stopped, _ = recorded_cache_slots(model, inputs, (stop,))
    model.compile(sampler="greedy")
    got, slots = recorded_cache_slots(model, inputs)
    np.testing.assert_array_equal(got, expected)
    assert slots and all(s[0] == 3 for s in slots)
    got, _ = recorded_cache_slots(model, inputs, (stop,))
    np.testing.assert_array_equal(got, expected_stopped)
    assert (got[0] >= 0).sum() < (expected[0] >= 0).sum()
