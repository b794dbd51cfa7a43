"""PaliGemmaCausalLMPreprocessor: images, prompts and answers to model inputs."""

import keras
import keras_hub
import numpy as np

from keras_paligemma.models.backbone import PaliGemmaBackbone
from keras_paligemma.models.image_converter import PaliGemmaImageConverter
from keras_paligemma.models.image_converter import is_single_image
from keras_paligemma.models.shared_images import flatten_prompt_groups
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
    packs prompts (and optional answer prefixes) for `generate()`; there,
    one image may come with a list of prompts, and a batch of images with
    one list of prompts per image (see `shared_images`): each image is
    converted once and an `image_index` input maps prompts to images.

    Args:
        tokenizer: a `PaliGemmaTokenizer`.
        image_converter: a `PaliGemmaImageConverter`.
        sequence_length: packed text length (image tokens not counted).
        add_start_token, add_end_token: add `<bos>` / `<eos>`.
        num_images: images per example, as the backbone's `num_images`.
            Above 1, each example's `images` is a list of 1 to
            `num_images` images (missing ones are padded and masked
            through `image_mask`), or a dense array with an optional
            `image_mask` input.

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

    def __init__(
        self,
        tokenizer,
        image_converter=None,
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        num_images=1,
        **kwargs,
    ):
        super().__init__(
            tokenizer=tokenizer,
            image_converter=image_converter,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(
                f"`num_images` must be a positive int; got {num_images!r}."
            )
        self.num_images = num_images

    def _call_python(self, x, y=None, sample_weight=None, sequence_length=None):
        x = self._checked(x, ("images", "prompts", "responses"))
        length = sequence_length or self.sequence_length
        packed = self._pack(x, length + 1, self.add_end_token)
        inputs = {key: value[..., :-1] for key, value in packed.items()}
        inputs.update(self._images(x))
        y = packed["token_ids"][..., 1:]
        sample_weight = packed["response_mask"][..., 1:]
        return keras.utils.pack_x_y_sample_weight(inputs, y, sample_weight)

    def _generate_preprocess_python(self, x, sequence_length=None):
        x = flatten_prompt_groups(self._checked(x, ("images", "prompts")))
        length = sequence_length or self.sequence_length
        packed = {**self._pack(x, length, False), **self._images(x)}
        if "image_index" in x:
            packed["image_index"] = x["image_index"]
        return packed

    def _pack(self, x, sequence_length, add_end_token):
        """`<bos> prompt \n [response] [<eos>]` token ids and masks."""
        if not self.built:
            self.build(None)
        segments = (self.tokenizer(_end_with_newline(x["prompts"])),)
        if "responses" in x:
            segments += (self.tokenizer(x["responses"]),)
        token_ids, segment_ids = self.packer(
            segments,
            sequence_length=sequence_length,
            add_start_value=self.add_start_token,
            add_end_value=add_end_token,
        )
        return {
            "token_ids": token_ids,
            "padding_mask": token_ids != self.tokenizer.pad_token_id,
            "response_mask": segment_ids == 1,
        }

    def _images(self, x):
        """Converted `images` (and `image_mask` for several per example)."""
        images = x["images"]
        if self.num_images == 1:
            return {"images": self.image_converter(images)}
        if isinstance(images, (list, tuple)):
            return self._image_lists(images)
        # A dense `(batch, num_images, height, width, 3)` array or tensor.
        shape = tuple(images.shape)
        if len(shape) != 5 or shape[1] != self.num_images:
            raise ValueError(
                f"`images` must hold {self.num_images} images per example: a "
                "list of lists, or an array of shape (batch, "
                f"{self.num_images}, height, width, 3); got shape {shape}."
            )
        flat = keras.ops.reshape(images, (-1,) + shape[2:])
        converted = self.image_converter(flat)
        size = tuple(converted.shape[1:])
        image_mask = x.get("image_mask")
        if image_mask is None:
            image_mask = np.ones(shape[:2], "int32")
        return {
            "images": keras.ops.reshape(converted, (-1, self.num_images) + size),
            "image_mask": image_mask,
        }

    def _image_lists(self, examples):
        """A list (batch) of lists of images, padded to `num_images`."""
        converted, masks = [], []
        for images in examples:
            if is_single_image(images):
                images = [images]
            if not 1 <= len(images) <= self.num_images:
                raise ValueError(
                    f"Each example takes 1 to {self.num_images} images; got "
                    f"{len(images)}."
                )
            batch = keras.ops.convert_to_numpy(self.image_converter(list(images)))
            missing = self.num_images - len(images)
            padding = np.zeros((missing,) + batch.shape[1:], batch.dtype)
            converted.append(np.concatenate([batch, padding]))
            masks.append([1] * len(images) + [0] * missing)
        return {
            "images": np.stack(converted),
            "image_mask": np.array(masks, "int32"),
        }

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
        return x

    def get_config(self):
        return {**super().get_config(), "num_images": self.num_images}
