"""What `fit()` and `evaluate()` accept beyond keras-hub's pipeline.

keras-hub turns in-memory inputs into a `tf.data`/grain dataset before
preprocessing, which needs rectangular arrays. PaliGemma users hold lists
of PIL images or arrays of different sizes, and Python generators of raw
`{"images", "prompts", "responses"}` batches; both are made to work here:

- a dict whose `images` is a list is resized to the model's image size
  first (float pixels, the same resize the preprocessor does), so every
  example becomes one row of a rectangular array;
- a generator (or any iterator) of raw dict batches is preprocessed batch
  by batch in Python and given to Keras as `(x, y, sample_weight)`;
- in-memory inputs are shuffled again at every epoch, as `keras.Model.fit`
  shuffles arrays (`shuffle=True`, its default). keras-hub batches them
  into a `tf.data.Dataset` in their given order, so Keras ignores
  `shuffle` (and warns that it was passed) and every epoch saw the
  examples in the same order. `validation_split` takes the last examples
  before shuffling, as in Keras; `shuffle=False` keeps the given order.

`tf.data.Dataset`s go to keras-hub unchanged.
"""

import inspect

import keras
import numpy as np


class FitInputs:
    """Mixin of `PaliGemmaCausalLM`: raw inputs of every common kind."""

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        sample_weight=None,
        validation_split=None,
        validation_data=None,
        shuffle=True,
        **kwargs,
    ):
        if _is_iterator(x):
            return keras.Model.fit(
                self, self._preprocessed(x), y, sample_weight=sample_weight,
                validation_split=validation_split,
                validation_data=validation_data, shuffle=shuffle, **kwargs
            )
        x = self._rectangular(x)
        examples = _examples(x, y, sample_weight) if shuffle else None
        if examples is not None:
            if validation_split and validation_data is None:
                examples, validation_data = _split(examples, validation_split)
            x = shuffled_batches(examples, batch_size or 32)
            y = sample_weight = batch_size = validation_split = None
            shuffle = False  # Done here; Keras would warn about a dataset.
        return super().fit(
            x, y, batch_size=batch_size, sample_weight=sample_weight,
            validation_split=validation_split, validation_data=validation_data,
            shuffle=shuffle, **kwargs
        )

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if _is_iterator(x):
            return keras.Model.evaluate(self, self._preprocessed(x), y, **kwargs)
        return super().evaluate(
            self._rectangular(x), y, batch_size=batch_size, **kwargs
        )

    def _preprocessed(self, batches):
        for batch in batches:
            if isinstance(batch, dict) and "prompts" in batch:
                batch = self.preprocessor(self._rectangular(batch))
            yield batch

    def _rectangular(self, x):
        """`x` with a list of single images resized to one array."""
        if (
            not isinstance(x, dict)
            or not isinstance(x.get("images"), (list, tuple))
            or self.preprocessor is None
            or self.preprocessor.num_images != 1
        ):
            return x
        # The same converter (resize, crop/pad settings), minus the scaling.
        converter = self.preprocessor.image_converter
        pixels = type(converter).from_config(
            {**converter.get_config(), "scale": 1.0, "offset": 0.0}
        )
        return {**x, "images": keras.ops.convert_to_numpy(pixels(x["images"]))}


def shuffled_batches(examples, batch_size):
    """A `tf.data.Dataset` of `batch_size` examples of `examples` (arrays
    with one example per row, in any nesting), in a new random order at
    every pass. The order follows TensorFlow's global seed
    (`keras.utils.set_random_seed`). The arrays are held once; each batch
    gathers its rows.

    Example:

    >>> data = {"prompts": np.array(["a", "b", "c"]), "ids": np.arange(3)}
    >>> batches = list(shuffled_batches(data, batch_size=2))
    >>> [len(b["ids"]) for b in batches], sorted(
    ...     int(i) for b in batches for i in b["ids"])
    ([2, 1], [0, 1, 2])
    """
    import tensorflow as tf

    count = _example_count(examples)
    data = tf.data.Dataset.from_tensors(examples).repeat()
    orders = tf.data.Dataset.range(count).shuffle(
        count, reshuffle_each_iteration=True
    )
    return tf.data.Dataset.zip((orders.batch(batch_size), data)).map(
        lambda rows, arrays: tf.nest.map_structure(
            lambda array: tf.gather(array, rows), arrays
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def _split(examples, validation_split):
    """`(training, validation)`: the validation part is the last
    `validation_split` of the examples, as in `keras.Model.fit`."""
    if not 0 < validation_split < 1:
        raise ValueError(
            "`validation_split` must be a float between 0 and 1, got "
            f"{validation_split!r}."
        )
    count = _example_count(examples)
    split_at = int(count * (1 - validation_split))
    if not 0 < split_at < count:
        raise ValueError(
            f"`validation_split={validation_split}` leaves no examples for "
            f"training or for validation out of {count}."
        )
    return (
        keras.tree.map_structure(lambda a: a[:split_at], examples),
        keras.tree.map_structure(lambda a: a[split_at:], examples),
    )


def _example_count(examples):
    counts = {len(a) for a in keras.tree.flatten(examples)}
    if len(counts) != 1:
        raise ValueError(
            "Every input of `fit` must hold the same number of examples; "
            f"got lengths {sorted(counts)}."
        )
    return counts.pop()


def _examples(x, y, sample_weight):
    """`(x, y, sample_weight)` packed as Keras does, every array of
    examples as numpy; None unless `x` is a dict of arrays, lists or
    tensors holding one rectangular array each (a dataset, or images of
    several sizes per example, go to keras-hub as given)."""
    if not isinstance(x, dict) or (y is None and sample_weight is not None):
        return None
    try:
        packed = keras.utils.pack_x_y_sample_weight(
            _array(x), *(None if p is None else _array(p) for p in (y, sample_weight))
        )
    except (TypeError, ValueError):  # Ragged, or not array-like.
        return None
    if any(array.dtype == object for array in keras.tree.flatten(packed)):
        return None
    return packed


def _array(value):
    """One array of examples (a list of prompts, say) as numpy; a dict
    (of `y`) keeps its keys."""
    if isinstance(value, dict):
        return {key: _array(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return np.asarray(value)
    if keras.ops.is_tensor(value):
        return keras.ops.convert_to_numpy(value)
    raise TypeError(f"Not an array of examples: {type(value)}")


def _is_iterator(x):
    return inspect.isgenerator(x) or (
        hasattr(x, "__next__") and not hasattr(x, "element_spec")
    )
