"""PaliGemmaCausalLMPreprocessor: images, prompts and answers to model inputs."""

import keras
import keras_hub
import numpy as np

from keras_paligemma.models.backbone import PaliGemmaBackbone
from keras_paligemma.models.image_converter import PaliGemmaImageConverter
from keras_paligemma.models.tokenizer import PaliGemmaTokenizer


def _end_with_newline(prompts):
    """Append `"\\n"` to every prompt that does not already end with one."""
    if isinstance(prompts, bytes):
        prompts = prompts.decode("utf-8")
    if isinstance(prompts, str):
        return prompts if prompts.endswith("\n") else prompts + "\n"
    if isinstance(prompts, (list, tuple)):
        return [_end_with_newline(p) for p in prompts]
    if isinstance(prompts, np.ndarray):
        return _end_with_newline(prompts.tolist())
    import tensorflow as tf

    if isinstance(prompts, tf.Tensor) and prompts.dtype == tf.string:
        ends_with_newline = tf.strings.regex_full_match(prompts, r"(?s).*\n")
        return tf.where(ends_with_newline, prompts, prompts + "\n")
    raise TypeError(
        "`prompts` must be a string, a list of strings or a string tensor; "
        f"got {type(prompts).__name__}."
    )


@keras.saving.register_keras_serializable(package="keras_paligemma")
class PaliGemmaCausalLMPreprocessor(
    keras_hub.models.PaliGemmaCausalLMPreprocessor
):
    """Pack `images` / `prompts` / `responses` the way PaliGemma was trained.

    Text is laid out as `<bos> prompt \\n` (the prefix, full attention)
    followed by `response <eos>` (causal, the only part with a loss), padded
    to `sequence_length`. The `"\\n"` that ends the prefix is appended when
    a prompt lacks it and never doubled, so keras-hub style prompts
    (`"caption en\\n"`) and transformers style prompts (`"caption en"`)
    give the same tokens. Images go through `PaliGemmaImageConverter`
    (whole image resized to the square, values in `[-1, 1]`).

    Calling the layer returns `(x, y, sample_weight)` for `fit()`: `x` holds
    `images`, `token_ids`, `padding_mask` and `response_mask`, `y` the next
    tokens and `sample_weight` marks the answer tokens. `generate_preprocess`
    packs prompts (and optional answer prefixes) for `generate()`.

    Args:
        tokenizer: a `PaliGemmaTokenizer`.
        image_converter: a `PaliGemmaImageConverter`.
        sequence_length: packed text length (image tokens not counted).
        add_start_token, add_end_token: add `<bos>` / `<eos>`.

    Example:

    >>> preprocessor = PaliGemmaCausalLMPreprocessor.from_preset(
    ...     "presets/pali_gemma_tiny_random", sequence_length=8)
    >>> x, y, weights = preprocessor({
    ...     "images": np.zeros((1, 64, 48, 3), "uint8"),
    ...     "prompts": ["caption en"], "responses": ["a cat"]})
    >>> tuple(x["images"].shape)
    (1, 56, 56, 3)
    """

    backbone_cls = PaliGemmaBackbone
    tokenizer_cls = PaliGemmaTokenizer
    image_converter_cls = PaliGemmaImageConverter

    def _call_python(self, x, y=None, sample_weight=None, sequence_length=None):
        x = self._checked(x, ("images", "prompts", "responses"))
        return super()._call_python(
            x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def _generate_preprocess_python(self, x, sequence_length=None):
        x = self._checked(x, ("images", "prompts"))
        return super()._generate_preprocess_python(
            x, sequence_length=sequence_length
        )

    def _checked(self, x, required):
        if not isinstance(x, dict):
            raise TypeError(
                "Inputs must be a dict with keys "
                f"{', '.join(repr(k) for k in required)}; got "
                f"{type(x).__name__}."
            )
        missing = [key for key in required if key not in x]
        if missing:
            raise ValueError(
                f"Inputs are missing {missing}; got keys {sorted(x)}."
            )
        return {**x, "prompts": _end_with_newline(x["prompts"])}
