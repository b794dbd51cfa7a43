"""What `fit()` and `evaluate()` accept beyond keras-hub's pipeline.

keras-hub turns in-memory inputs into a dataset (grain's, or `tf.data`'s
without grain) before preprocessing, which needs rectangular arrays.
PaliGemma users hold lists of PIL images or arrays of different sizes,
and Python generators of raw `{"images", "prompts", "responses"}`
batches; both are made to work here:

- a dict whose `images` is a list is resized to the model's image size
  first (float pixels, the same resize the preprocessor does), so every
  example becomes one row of a rectangular array (in `validation_data`
  too);
- a generator (or any iterator) of raw dict batches is preprocessed batch
  by batch in Python and given to Keras as `(x, y, sample_weight)`;
- in-memory examples are batched here (`batches`), shuffled again at
  every epoch as `keras.Model.fit` shuffles arrays (`shuffle=True`, its
  default). keras-hub batched them in their given order, so Keras
  ignored `shuffle` (and warned that it was passed) and every epoch saw
  the examples in the same order. `validation_split` holds out the last
  examples before shuffling, as in Keras (keras-hub refused it for lists
  of prompts), and validation batches have `validation_batch_size` or
  `batch_size` examples.

Datasets go to keras-hub unchanged, and Keras reads them as they are.
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
                self, self._preprocessed(x), y, batch_size=batch_size,
                sample_weight=sample_weight, validation_split=validation_split,
                validation_data=self._preprocessed_validation(validation_data),
                shuffle=shuffle, **kwargs
            )
        x = self._rectangular(x)
        examples = _examples(x, y, sample_weight)
        if examples is None:
            return super().fit(
                x, y, batch_size=batch_size, sample_weight=sample_weight,
                validation_split=validation_split,
                validation_data=self._rectangular_validation(validation_data),
                shuffle=shuffle, **kwargs
            )
        if validation_split and validation_data is None:
            examples, validation = _split(examples, validation_split)
        else:
            validation_data = self._rectangular_validation(validation_data)
            validation = _examples(
                *keras.utils.unpack_x_y_sample_weight(validation_data)
            )
        batch_size = batch_size or 32  # Keras' default.
        validation_batch_size = kwargs.pop("validation_batch_size", None)
        if validation is not None:
            validation_data = batches(
                validation, validation_batch_size or batch_size
            )
        return super().fit(
            batches(examples, batch_size, shuffled=bool(shuffle)),
            validation_data=validation_data,
            shuffle=False,  # Done here; Keras would warn about a dataset.
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        if _is_iterator(x):
            return keras.Model.evaluate(self, self._preprocessed(x), y, **kwargs)
        return super().evaluate(
            self._rectangular(x), y, batch_size=batch_size, **kwargs
        )

    def _preprocessed(self, raw_batches):
        for batch in raw_batches:
            if isinstance(batch, dict) and "prompts" in batch:
                batch = self.preprocessor(self._rectangular(batch))
            yield batch

    def _preprocessed_validation(self, data):
        """Validation data for `keras.Model.fit`: raw batches or a raw
        dict preprocessed, anything else as given."""
        if _is_iterator(data):
            return self._preprocessed(data)
        if isinstance(data, dict) and "prompts" in data:
            return self.preprocessor(self._rectangular(data))
        return data

    def _rectangular_validation(self, data):
        """`validation_data` (`x`, or a tuple or list starting with `x`)
        with `x`'s list of images resized (`_rectangular`)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return keras.utils.pack_x_y_sample_weight(
            self._rectangular(x), y, sample_weight
        )

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


def batches(examples, batch_size, shuffled=False):
    """A `tf.data.Dataset` of `batch_size` examples of `examples` (arrays
    with one example per row, in tuples and dicts), in their order or, if
    `shuffled`, in a new random order at every pass (following
    TensorFlow's global seed, which `keras.utils.set_random_seed` sets).
    The arrays are held once; each batch gathers its rows.

    Example:

    >>> data = {"prompts": np.array(["a", "b", "c"]), "ids": np.arange(3)}
    >>> [b["ids"].numpy().tolist() for b in batches(data, batch_size=2)]
    [[0, 1], [2]]
    >>> sorted(int(i) for b in batches(data, 2, shuffled=True) for i in b["ids"])
    [0, 1, 2]
    """
    import tensorflow as tf

    count = _example_count(examples)
    order = tf.data.Dataset.range(count)
    if shuffled:
        order = order.shuffle(count, reshuffle_each_iteration=True)
    data = tf.data.Dataset.from_tensors(examples).repeat()
    return tf.data.Dataset.zip((order.batch(batch_size), data)).map(
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
    """`(x, y, sample_weight)` packed as Keras does, as numpy arrays of
    examples; None unless `x` is a dict of arrays, lists or tensors with
    one rectangular array each (datasets, ragged tensors and images of
    several sizes per example go to keras-hub as given)."""
    if not isinstance(x, dict) or (y is None and sample_weight is not None):
        return None
    try:
        packed = keras.utils.pack_x_y_sample_weight(
            *(None if part is None else _arrays(part)
              for part in (x, y, sample_weight))
        )
    except (TypeError, ValueError):  # Ragged, or not array-like.
        return None
    for array in keras.tree.flatten(packed):
        if array.ndim == 0 or (
            array.dtype == object
            and not all(isinstance(item, (str, bytes)) for item in array.flat)
        ):
            return None
    return packed


def _arrays(value):
    """`value` as numpy, with `tf.data.Dataset.from_tensor_slices`'s
    structure: tuples and dicts are structure, a list is one array.
    Strings stay Python strings (a numpy string array would store each at
    the longest one's width); Python numbers become int32/float32, as
    `tf.data` reads them."""
    if isinstance(value, tuple):
        return tuple(_arrays(item) for item in value)
    if isinstance(value, dict):
        return {key: _arrays(item) for key, item in value.items()}
    import tensorflow as tf

    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        raise TypeError(f"Not a rectangular array: {type(value)}")
    if isinstance(value, np.ndarray):
        return value
    if keras.ops.is_tensor(value):
        return keras.ops.convert_to_numpy(value)
    if isinstance(value, tf.Tensor):  # Under another backend.
        return value.numpy()
    if not isinstance(value, list):
        raise TypeError(f"Not an array of examples: {type(value)}")
    array = np.asarray(value)
    if array.dtype.kind in "US":
        return np.asarray(value, dtype=object)
    narrower = {np.dtype("int64"): "int32", np.dtype("float64"): "float32"}
    return array.astype(narrower.get(array.dtype, array.dtype))


def _is_iterator(x):
    return inspect.isgenerator(x) or (
        hasattr(x, "__next__") and not hasattr(x, "element_spec")
    )
