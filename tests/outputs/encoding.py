"""Test helper: write boxes and masks codes as PaliGemma answer tokens."""


def location_tokens(box, image_size):
    """`(x_min, y_min, x_max, y_max)` pixels -> `<loc>` tokens (y, x order)."""
    height, width = image_size
    x_min, y_min, x_max, y_max = box
    values = [y_min / height, x_min / width, y_max / height, x_max / width]
    return "".join(f"<loc{min(int(v * 1024), 1023):04d}>" for v in values)


def detection_answer(objects, image_size):
    """`[(label, box), ...]` -> `'<loc..>x4 label ; ...'`."""
    return " ; ".join(
        location_tokens(box, image_size) + " " + label for label, box in objects
    )


def segmentation_answer(objects, image_size):
    """`[(label, box, codes), ...]` -> `'<loc..>x4<seg..>x16 label ; ...'`."""
    return " ; ".join(
        location_tokens(box, image_size)
        + "".join(f"<seg{c:03d}>" for c in codes)
        + " "
        + label
        for label, box, codes in objects
    )
