"""Parse `segment` answers (4 `<loc>` + 16 `<seg>` tokens) into masks."""

import dataclasses

import numpy as np

from keras_paligemma.outputs.detection import check_image_size
from keras_paligemma.outputs.detection import parse_objects
from keras_paligemma.outputs.mask_decoder import NUM_CODES


@dataclasses.dataclass(frozen=True, eq=False)
class Segmentation:
    """One segmented object.

    Attributes:
        label: the object's name as the model wrote it.
        box: `(x_min, y_min, x_max, y_max)` in pixels of the original image.
        codes: the 16 `<seg###>` codes.
        mask: bool `(height, width)` mask over the original image, or
            `None` when parsed without a decoder.
    """

    label: str
    box: tuple
    codes: tuple
    mask: np.ndarray = None


def parse_segmentations(text, image_size, decoder=None):
    """Parse a `segment` answer into `Segmentation`s.

    Each object is four location tokens, sixteen `<seg###>` codes and its
    label; objects are separated by ` ; `. With a `MaskDecoder`, the codes
    become a 64x64 mask that is resized (bilinear) into the box and
    thresholded at 0, giving a mask over the original image. Malformed
    objects are skipped with a warning.

    Args:
        text: the model's answer (a leading prompt line is ignored).
        image_size: `(height, width)` of the original image.
        decoder: a `MaskDecoder`, e.g.
            `MaskDecoder.from_vae_checkpoint("vae-oid.npz")`, or `None` to
            return boxes and codes only.

    Returns:
        A list of `Segmentation`.

    Example:

    >>> answer = "<loc0000><loc0000><loc0512><loc0512>" + "<seg007>" * 16
    >>> [s.box for s in parse_segmentations(answer + " cat", (10, 20))]
    [(0.0, 0.0, 10.0, 5.0)]
    """
    image_size = check_image_size(image_size)
    parsed = parse_objects(text, image_size, "segmentation", NUM_CODES)
    if decoder is None or not parsed:
        return [Segmentation(label, box, codes) for label, box, codes in parsed]
    from keras import ops

    small_masks = ops.convert_to_numpy(
        decoder(np.array([codes for _, _, codes in parsed], "int32"))
    )
    return [
        Segmentation(label, box, codes, paste_mask(small, box, image_size))
        for (label, box, codes), small in zip(parsed, small_masks)
    ]


def paste_mask(small_mask, box, image_size):
    """Resize a decoder mask into its box; bool mask of the whole image."""
    from PIL import Image

    height, width = image_size
    x_min, y_min, x_max, y_max = box
    left, top = int(round(x_min)), int(round(y_min))
    right = max(int(round(x_max)), left + 1)
    bottom = max(int(round(y_max)), top + 1)
    resized = Image.fromarray(np.asarray(small_mask, "float32"), mode="F")
    resized = np.asarray(
        resized.resize((right - left, bottom - top), Image.BILINEAR)
    )
    mask = np.zeros((height, width), bool)
    inside = resized > 0
    mask[top:bottom, left:right] = inside[: height - top, : width - left]
    return mask
