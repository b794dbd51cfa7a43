"""Parse `detect` answers (`<loc####>` tokens) into boxes in image pixels."""

import dataclasses
import re
import warnings

LOC_TOKEN = re.compile(r"<loc(\d{4})>")
SEG_TOKEN = re.compile(r"<seg(\d{3})>")
LOCATION_BINS = 1024


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        label: the object's name as the model wrote it.
        box: `(x_min, y_min, x_max, y_max)` in pixels of the original image.
    """

    label: str
    box: tuple


def split_objects(text):
    """The ` ; `-separated object descriptions of an answer, stripped."""
    return [part.strip() for part in text.split(";") if part.strip()]


def check_image_size(image_size):
    """`(height, width)` as two positive ints, or a clear error."""
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise TypeError(
            "`image_size` must be `(height, width)` of the original image; "
            f"got {image_size!r}."
        ) from None
    if height <= 0 or width <= 0:
        raise ValueError(
            f"`image_size` must be positive `(height, width)`; got {image_size!r}."
        )
    return height, width


def box_from_locations(locations, image_size):
    """Four `<loc>` values `y_min x_min y_max x_max` to a pixel box.

    Returns `(x_min, y_min, x_max, y_max)` scaled to `image_size` (the
    ORIGINAL image: the model saw it resized to a square, so each axis
    scales by its own side), or `None` if the box is empty or inverted.
    """
    height, width = image_size
    y_min, x_min, y_max, x_max = (v / LOCATION_BINS for v in locations)
    if y_max <= y_min or x_max <= x_min:
        return None
    return (x_min * width, y_min * height, x_max * width, y_max * height)


def parse_detections(text, image_size):
    """Parse a `detect` answer into `Detection`s.

    Each object is four location tokens (`y_min x_min y_max x_max`, in
    1024ths of the image) followed by its label; objects are separated by
    ` ; `. Malformed objects (fewer than four location tokens, an empty or
    inverted box) are skipped with a warning; nothing raises on model
    output.

    Args:
        text: the model's answer (a leading prompt line is ignored).
        image_size: `(height, width)` of the original image.

    Returns:
        A list of `Detection`.

    Example:

    >>> parse_detections("<loc0000><loc0256><loc0512><loc1023> cat",
    ...                  image_size=(200, 400))
    [Detection(label='cat', box=(100.0, 0.0, 399.609375, 100.0))]
    """
    return [
        Detection(label=label, box=box)
        for label, box, _ in parse_objects(text, image_size, "detection")
    ]


def parse_objects(text, image_size, kind, num_codes=None):
    """`(label, box, codes)` of each well-formed object in an answer.

    The shared reading of `detect` and `segment` answers: objects are
    ` ; `-separated, each with four `<loc>` tokens (and, when `num_codes`
    is given, exactly that many `<seg>` tokens); the rest is the label.
    Malformed objects are skipped with a warning naming `kind`.
    """
    image_size = check_image_size(image_size)
    parsed = []
    for part in split_objects(text.rsplit("\n", 1)[-1]):
        locations = [int(v) for v in LOC_TOKEN.findall(part)]
        codes = tuple(int(v) for v in SEG_TOKEN.findall(part))
        label = SEG_TOKEN.sub("", LOC_TOKEN.sub("", part)).strip()
        problem = None
        if len(locations) != 4:
            problem = f"expected 4 location tokens, found {len(locations)}"
        elif num_codes is not None and len(codes) != num_codes:
            problem = (
                f"expected {num_codes} segmentation tokens, found {len(codes)}"
            )
        else:
            box = box_from_locations(locations, image_size)
            if box is None:
                problem = "empty or inverted box"
        if problem:
            warnings.warn(
                f"Skipping {kind} {part[:80]!r}: {problem}.", stacklevel=3
            )
            continue
        parsed.append((label, box, codes))
    return parsed
