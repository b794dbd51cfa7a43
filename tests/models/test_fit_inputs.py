"""`fit` on in-memory examples: shuffled at every epoch, as Keras does."""

import warnings

import keras
import numpy as np
import pytest

from conftest import TINY_PRESET
from keras_paligemma import PaliGemmaCausalLM
from keras_paligemma.models.fit_inputs import _examples
from keras_paligemma.models.fit_inputs import batches

EXAMPLES = 6


def examples(count=EXAMPLES, start=0):
    """Example `i`'s image is the constant `10 * i`, its size varies."""
    return {
        "images": [
            np.full((32 + i, 40 - i, 3), 10 * i, "uint8")
            for i in range(start, start + count)
        ],
        "prompts": ["caption en"] * count,
        "responses": [f"answer {i}" for i in range(start, start + count)],
    }


def image_ids(batch):
    """The examples of a preprocessed batch, from their images' pixels
    (`10 * i`, scaled to [-1, 1])."""
    pixels = keras.ops.convert_to_numpy(batch[0]["images"])[:, 0, 0, 0]
    return [int(i) for i in np.rint((pixels + 1) * 127.5 / 10)]


def fit_order(without_preprocessor=False, **fit_kwargs):
    """The examples each training step got, one list per epoch, the
    examples of each validation batch, the history and `fit`'s warnings.
    `without_preprocessor`: a causal LM without one, given the examples
    preprocessed as `x`, `y` and `sample_weight`."""
    keras.utils.set_random_seed(0)
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    causal_lm.preprocessor.sequence_length = 16
    fit_kwargs = {"x": examples(), "batch_size": 2, **fit_kwargs}
    if without_preprocessor:
        x, y, weights = causal_lm.preprocessor(fit_kwargs["x"])
        fit_kwargs.update(x=x, y=y, sample_weight=weights)
        causal_lm = PaliGemmaCausalLM(causal_lm.backbone, preprocessor=None)
    causal_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer="sgd",
        run_eagerly=True,  # So the steps see the batches' values.
    )
    seen, validated = [], []
    train_step, test_step = causal_lm.train_step, causal_lm.test_step

    def recording_train_step(*args):  # JAX passes `(state, data)`.
        seen.extend(image_ids(args[-1]))
        return train_step(*args)

    def recording_test_step(*args):
        validated.append(image_ids(args[-1]))
        return test_step(*args)

    causal_lm.train_step = recording_train_step
    causal_lm.test_step = recording_test_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = causal_lm.fit(verbose=0, **fit_kwargs)
    per_epoch = len(seen) // fit_kwargs.get("epochs", 1)
    epochs = [seen[i : i + per_epoch] for i in range(0, len(seen), per_epoch)]
    return epochs, validated, history, [str(w.message) for w in caught]


def test_fit_shuffles_in_memory_examples_at_every_epoch():
    epochs, _, history, caught = fit_order(epochs=3)
    assert [sorted(order) for order in epochs] == [list(range(EXAMPLES))] * 3
    assert len({tuple(order) for order in epochs}) > 1, epochs
    assert not any("shuffle" in message for message in caught), caught
    assert np.all(np.isfinite(history.history["loss"]))


def test_fit_shuffles_preprocessed_arrays_with_targets_and_weights():
    epochs, validated, history, _ = fit_order(
        without_preprocessor=True, epochs=6, validation_split=0.35
    )
    # Three examples: six epochs, so that equal orders are unlikely.
    assert [sorted(order) for order in epochs] == [[0, 1, 2]] * 6
    assert len({tuple(order) for order in epochs}) > 1, epochs
    assert validated == [[3, 4], [5]] * 6
    assert np.all(np.isfinite(history.history["val_loss"]))


def test_fit_keeps_the_order_when_shuffle_is_false():
    epochs, _, _, _ = fit_order(epochs=2, shuffle=False)
    assert epochs == [list(range(EXAMPLES))] * 2


@pytest.mark.parametrize("shuffle", [True, False])
def test_validation_split_holds_out_the_last_examples(shuffle):
    epochs, validated, history, _ = fit_order(
        epochs=2, validation_split=0.5, shuffle=shuffle
    )
    assert [sorted(order) for order in epochs] == [[0, 1, 2]] * 2
    # In order, in batches of `batch_size`, once per epoch.
    assert validated == [[3, 4], [5]] * 2
    assert np.all(np.isfinite(history.history["val_loss"]))


def test_validation_data_of_mixed_image_sizes_in_batches_of_its_size():
    _, validated, history, _ = fit_order(
        validation_data=examples(count=3, start=6), validation_batch_size=1
    )
    assert validated == [[6], [7], [8]]
    assert np.all(np.isfinite(history.history["val_loss"]))
    _, validated, _, _ = fit_order(validation_data=[examples(3, start=6)])
    assert validated == [[6, 7], [8]]  # `batch_size`, from a list too.


def test_generators_take_raw_validation_data():
    def raw_batches():
        while True:
            yield examples(count=2)

    _, validated, _, _ = fit_order(
        x=raw_batches(), steps_per_epoch=2,
        validation_data=examples(count=3, start=6),
    )
    assert validated == [[6, 7], [8]]  # In batches of `batch_size`.


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
    dataset = batches(data, batch_size=4, shuffled=True)
    passes = []
    for _ in range(3):
        one_pass = list(dataset)
        assert [len(y) for _, y in one_pass] == [4, 4, 2]
        ids = np.concatenate([x["ids"] for x, _ in one_pass])
        for x, y in one_pass:  # The rows of every array stay together.
            np.testing.assert_array_equal(y, np.asarray(x["ids"]) * 2)
            assert [t.decode() for t in np.asarray(x["text"])] == [
                "abcdefghij"[i] for i in np.asarray(x["ids"])
            ]
        assert sorted(ids) == list(range(10))
        passes.append(tuple(ids))
    assert len(set(passes)) > 1


def test_inputs_that_are_not_one_array_each_go_to_keras_hub_as_given():
    import tensorflow as tf

    ragged = {"images": [np.zeros((2, 4, 4, 3)), np.zeros((1, 4, 4, 3))],
              "prompts": ["a", "b"]}
    assert _examples(ragged, None, None) is None
    assert _examples({"prompts": ["a", object()]}, None, None) is None
    assert _examples({"ids": tf.ragged.constant([[1, 2], [3]])}, None, None) is None
    assert _examples({"prompts": "a"}, None, None) is None


def test_examples_keep_tf_data_structure_and_types():
    x, y, weights = _examples(
        {"prompts": ["a", "a much longer prompt"], "ids": np.arange(2)},
        ([1, 2], [3, 4]),
        [0.5, 1.0],
    )
    # Strings as Python objects, not at the longest one's width.
    assert x["prompts"].dtype == object
    assert x["prompts"].tolist() == ["a", "a much longer prompt"]
    assert x["ids"].dtype == np.arange(2).dtype  # Arrays keep theirs.
    assert isinstance(y, tuple) and [a.tolist() for a in y] == [[1, 2], [3, 4]]
    assert y[0].dtype == "int32" and weights.dtype == "float32"
    first = next(iter(batches((x, y, weights), batch_size=1)))
    assert first[0]["prompts"].numpy().tolist() == [b"a"]
