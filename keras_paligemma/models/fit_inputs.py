"""What `fit()` and `evaluate()` accept beyond keras-hub's pipeline.

keras-hub turns in-memory inputs into a `tf.data`/grain dataset before
preprocessing, which needs rectangular arrays. PaliGemma users hold lists
of PIL images or arrays of different sizes, and Python generators of raw
`{"images", "prompts", "responses"}` batches; both are made to work here:

- a dict whose `images` is a list is resized to the model's image size
  first (float pixels, the same resize the preprocessor does), so every
  example becomes one row of a rectangular array;
- a generator (or any iterator) of raw dict batches is preprocessed batch
  by batch in Python and given to Keras as `(x, y, sample_weight)`.

`tf.data.Dataset`s and rectangular arrays go to keras-hub unchanged.
"""

import inspect

import keras


class FitInputs:
    """Mixin of `PaliGemmaCausalLM`: raw inputs of every common kind."""

    def fit(self, x=None, y=None, batch_size=None, **kwargs):
        if _is_iterator(x):
            return keras.Model.fit(self, self._preprocessed(x), y, **kwargs)
        return super().fit(self._rectangular(x), y, batch_size=batch_size, **kwargs)

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


def _is_iterator(x):
    return inspect.isgenerator(x) or (
        hasattr(x, "__next__") and not hasattr(x, "element_spec")
    )
