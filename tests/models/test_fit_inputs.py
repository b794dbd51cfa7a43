"""`fit` on in-memory examples: shuffled at every epoch, as Keras does."""

import warnings

import keras
import numpy as np
import pytest

from conftest import TINY_PRESET
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.models.fit_inputs import shuffled_batches

EXAMPLES = 6


def examples():
    """Six examples; example `i`'s image is the constant `10 * i`."""
    return {
        "images": np.stack(
            [np.full((32, 32, 3), 10 * i, "uint8") for i in range(EXAMPLES)]
        ),
        "prompts": ["caption en"] * EXAMPLES,
        "responses": [f"answer {i}" for i in range(EXAMPLES)],
    }


def fit_order(**fit_kwargs):
    """The examples each training step got, one list per epoch, and the
    warnings `fit` raised."""
    keras.utils.set_random_seed(0)
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.preprocessor.sequence_length = 16
    causal_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer="sgd",
        run_eagerly=True,  # So the steps see the batches' values.
    )
    seen = []
    train_step = causal_lm.train_step

    def recording_step(*args):  # JAX passes `(state, data)`.
        pixels = keras.ops.convert_to_numpy(args[-1][0]["images"])[:, 0, 0, 0]
        # Pixel 10 * i, scaled to [-1, 1].
        seen.extend(int(i) for i in np.rint((pixels + 1) * 127.5 / 10))
        return train_step(*args)

    causal_lm.train_step = recording_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = causal_lm.fit(examples(), batch_size=2, verbose=0, **fit_kwargs)
    per_epoch = len(seen) // fit_kwargs.get("epochs", 1)
    epochs = [seen[i : i + per_epoch] for i in range(0, len(seen), per_epoch)]
    return epochs, history, [str(w.message) for w in caught]


def test_fit_shuffles_in_memory_examples_at_every_epoch():
    epochs, history, caught = fit_order(epochs=3)
    assert [sorted(order) for order in epochs] == [list(range(EXAMPLES))] * 3
    assert len({tuple(order) for order in epochs}) > 1, epochs
    assert not any("shuffle" in message for message in caught), caught
    assert np.all(np.isfinite(history.history["loss"]))


def test_fit_keeps_the_order_when_shuffle_is_false():
    epochs, _, _ = fit_order(epochs=2, shuffle=False)
    assert epochs == [list(range(EXAMPLES))] * 2


def test_validation_split_holds_out_the_last_examples_before_shuffling():
    epochs, history, _ = fit_order(epochs=2, validation_split=0.5)
    assert [sorted(order) for order in epochs] == [[0, 1, 2]] * 2
    assert np.all(np.isfinite(history.history["val_loss"]))


@pytest.mark.parametrize("validation_split", [1.0, -0.1, 0.9])
def test_validation_split_errors(validation_split):
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="validation_split"):
        causal_lm.fit(examples(), validation_split=validation_split, verbose=0)


def test_examples_of_different_lengths_are_an_error():
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.compile(optimizer="sgd")
    data = {**examples(), "responses": ["one"]}
    with pytest.raises(ValueError, match="same number of examples"):
        causal_lm.fit(data, verbose=0)


def test_shuffled_batches_cover_every_example_once_per_pass():
    keras.utils.set_random_seed(1)
    data = ({"ids": np.arange(10), "text": np.array(list("abcdefghij"))},
            np.arange(10) * 2)
    dataset = shuffled_batches(data, batch_size=4)
    passes = []
    for _ in range(3):
        batches = list(dataset)
        assert [len(y) for _, y in batches] == [4, 4, 2]
        ids = np.concatenate([x["ids"] for x, _ in batches])
        for x, y in batches:  # The rows of every array stay together.
            np.testing.assert_array_equal(y, np.asarray(x["ids"]) * 2)
            assert [t.decode() for t in np.asarray(x["text"])] == [
                "abcdefghij"[i] for i in np.asarray(x["ids"])
            ]
        assert sorted(ids) == list(range(10))
        passes.append(tuple(ids))
    assert len(set(passes)) > 1


def test_inputs_that_are_not_one_array_each_go_to_keras_hub_as_given():
    from keras_paligemma.models.fit_inputs import _examples

    ragged = {"images": [np.zeros((2, 4, 4, 3)), np.zeros((1, 4, 4, 3))],
              "prompts": ["a", "b"]}
    assert _examples(ragged, None, None) is None
    assert _examples({"prompts": ["a", object()]}, None, None) is None
    x, y, weights = _examples({"prompts": ("a", "b")}, [1, 2], [0.5, 1.0])
    assert x["prompts"].tolist() == ["a", "b"] and y.tolist() == [1, 2]
    assert weights.tolist() == [0.5, 1.0]
