"""Draw detections and segmentations over the original image (PIL)."""

import numpy as np

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
]


def draw_results(image, results, output_path=None, line_width=2):
    """Draw boxes, labels and (if present) masks; optionally save a PNG.

    Args:
        image: the original image: file path, PIL image or array.
        results: `Detection`s or `Segmentation`s (boxes in pixels of this
            image, as the parsers return them).
        output_path: where to save the picture as PNG, or `None`.
        line_width: box outline width in pixels.

    Returns:
        The annotated `PIL.Image.Image` (RGB).

    Example:

    >>> from keras_paligemma.outputs.detection import Detection
    >>> picture = draw_results(np.zeros((20, 30, 3), "uint8"),
    ...                        [Detection("cat", (2.0, 3.0, 12.0, 15.0))])
    >>> picture.getpixel((2, 8)) == PALETTE[0]
    True
    """
    from PIL import Image, ImageDraw

    from keras_paligemma.models.image_converter import load_image

    picture = Image.fromarray(load_image(image, "image").astype("uint8"))
    for index, result in enumerate(results):
        colour = PALETTE[index % len(PALETTE)]
        mask = getattr(result, "mask", None)
        if mask is not None:
            pixels = np.asarray(picture).copy()
            pixels[mask] = (0.5 * pixels[mask] + 0.5 * np.array(colour)).astype(
                "uint8"
            )
            picture = Image.fromarray(pixels)
        draw = ImageDraw.Draw(picture)
        x_min, y_min, x_max, y_max = (int(round(v)) for v in result.box)
        draw.rectangle(
            (x_min, y_min, max(x_max - 1, x_min), max(y_max - 1, y_min)),
            outline=colour,
            width=line_width,
        )
        if result.label:
            text_top = max(y_min - 11, 0)
            draw.rectangle(
                (x_min, text_top, x_min + 6 * len(result.label) + 2, text_top + 10),
                fill=colour,
            )
            draw.text((x_min + 1, text_top), result.label, fill=(255, 255, 255))
    if output_path is not None:
        picture.save(output_path, format="PNG")
    return picture
