"""PaliGemmaImageConverter: any image in, a square image in `[-1, 1]` out."""

import os

import keras
import keras_hub
import numpy as np

from keras_paligemma.models.backbone import PaliGemmaBackbone


def load_image(image, argument="images"):
    """One image as a float32 `(height, width, 3)` RGB array in `[0, 255]`.

    Accepts a file path, a PIL image (any mode: RGBA, grayscale, palette),
    or an array/tensor of shape `(height, width)`, `(height, width, 1)`,
    `(height, width, 3)` or `(height, width, 4)` (alpha is dropped).
    Numeric values are taken to be in `[0, 255]`.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        if not os.path.exists(image):
            raise FileNotFoundError(f"`{argument}`: no image file at {image!r}.")
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except UnidentifiedImageError as error:
            raise ValueError(
                f"`{argument}`: {image!r} is not an image file PIL can read."
            ) from error
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype="float32")
    array = np.asarray(keras.ops.convert_to_numpy(image))
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"`{argument}` must hold numbers, PIL images or file paths; got "
            f"an array of dtype {array.dtype}."
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"`{argument}`: expected an image of shape (height, width), "
            "(height, width, 1), (height, width, 3) or (height, width, 4); "
            f"got shape {array.shape}."
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3].astype("float32")


def decode_encoded_images(encoded, image_size):
    """TF graph op: encoded image bytes `[batch]` to float32 RGB images.

    Each JPEG/PNG/GIF/BMP is decoded to RGB (alpha dropped, grayscale
    repeated) and resized bilinearly, without antialiasing, to
    `image_size`; values stay in `[0, 255]`.
    """
    import tensorflow as tf

    def decode(data):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        image = tf.image.resize(tf.cast(image, "float32"), image_size)
        return tf.ensure_shape(image, tuple(image_size) + (3,))

    return tf.map_fn(
        decode,
        encoded,
        fn_output_signature=tf.TensorSpec(tuple(image_size) + (3,), tf.float32),
    )


def _is_string_tensor(images):
    if not type(images).__module__.startswith("tensorflow"):
        return False
    return images.dtype.name == "string"


def is_single_image(images):
    if isinstance(images, (str, os.PathLike)):
        return True
    if type(images).__module__.startswith("PIL."):
        return True
    return hasattr(images, "shape") and len(images.shape) in (2, 3)


@keras.saving.register_keras_serializable(package="keras_paligemma")
class PaliGemmaImageConverter(keras_hub.layers.ImageConverter):
    """Resize whole images to the model's square and map pixels to `[-1, 1]`.

    Like transformers and big_vision, and unlike keras-hub's default, the
    whole image is resized to the square (no centre crop), so nothing
    outside a crop is lost and box coordinates map back to the original
    image. Resizing is bilinear without antialiasing, as in big_vision (the
    code PaliGemma was trained with); pass `interpolation="bicubic"` to
    follow transformers, or `crop_to_aspect_ratio=True` for keras-hub's
    behaviour.

    Inputs may be a single image or a batch: file paths, PIL images (any
    mode), or arrays/tensors that are grayscale, RGB or RGBA, integer or
    float with values in `[0, 255]`. A list may mix sizes and kinds. Inside
    `tf.data` (e.g. `fit` on a dict of file paths), string tensors are read
    as file paths and decoded with TensorFlow. A
    single image gives `(size, size, 3)`, a batch `(batch, size, size, 3)`.

    Args:
        image_size: `(height, width)` of the model input, e.g. `(224, 224)`.
        scale, offset: pixels become `pixels * scale + offset`.
        crop_to_aspect_ratio: centre-crop to a square before resizing.
        interpolation: resize method.
        antialias: antialias when downscaling.

    Example:

    >>> converter = PaliGemmaImageConverter(image_size=(28, 28))
    >>> batch = converter([np.zeros((40, 60, 3), "uint8"),
    ...                    np.full((10, 10), 255, "uint8")])
    >>> batch = ops.convert_to_numpy(batch)
    >>> batch.shape, round(float(batch[0].max()), 4), round(float(batch[1].min()), 4)
    ((2, 28, 28, 3), -1.0, 1.0)
    """

    backbone_cls = PaliGemmaBackbone

    def __init__(
        self,
        image_size=None,
        scale=1.0 / 127.5,
        offset=-1.0,
        crop_to_aspect_ratio=False,
        interpolation="bilinear",
        antialias=False,
        **kwargs,
    ):
        super().__init__(
            image_size=image_size,
            scale=scale,
            offset=offset,
            crop_to_aspect_ratio=crop_to_aspect_ratio,
            interpolation=interpolation,
            antialias=antialias,
            **kwargs,
        )

    def _call_python(self, inputs):
        if isinstance(inputs, dict):
            return super()._call_python(inputs)
        if _is_string_tensor(inputs):
            # File paths inside `tf.data` (e.g. `fit` on a dict of paths).
            import tensorflow as tf

            paths = tf.reshape(inputs, [-1])
            encoded = tf.map_fn(tf.io.read_file, paths)
            images = decode_encoded_images(encoded, self.image_size)
            if inputs.shape.rank == 0:
                images = images[0]
            return super()._call_python(images)
        if is_single_image(inputs):
            return super()._call_python(load_image(inputs))
        if isinstance(inputs, (list, tuple)):
            converted = [super(PaliGemmaImageConverter, self)._call_python(
                load_image(image)) for image in inputs]
            return keras.ops.stack(converted)
        if hasattr(inputs, "shape") and len(inputs.shape) == 4:
            if inputs.shape[-1] != 3:
                inputs = [load_image(image) for image in inputs]
                return self._call_python(inputs)
            return super()._call_python(inputs)
        raise TypeError(
            "`images` must be an image (file path, PIL image, array of rank "
            "2 or 3), a batch array of rank 4, or a list of images; got "
            f"{type(inputs).__name__}"
            + (f" of shape {tuple(inputs.shape)}." if hasattr(inputs, "shape")
               else ".")
        )
