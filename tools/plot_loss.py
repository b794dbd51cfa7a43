"""Draw a training-loss curve to a PNG with Pillow (no plotting library).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "loss.png")
>>> save_loss_plot([3.0, 2.0, 1.5, 1.0, 0.4], path, title="demo")
>>> from PIL import Image
>>> Image.open(path).size
(640, 400)
"""

import math

from PIL import Image
from PIL import ImageDraw

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 40, 50


def smoothed(values, weight=0.9):
    """Exponential moving average, bias-corrected like TensorBoard's."""
    result, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**i))
    return result


def save_loss_plot(losses, path, title="training loss"):
    """Per-step `losses` (raw in grey, smoothed in blue) on a log y axis."""
    if not losses:
        raise ValueError("`losses` is empty: nothing to plot.")
    values = [math.log10(max(v, 1e-4)) for v in losses]
    low, high = min(values), max(values)
    high = high if high > low else low + 1
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    pen = ImageDraw.Draw(image)

    def point(step, value):
        x = LEFT + (WIDTH - LEFT - RIGHT) * step / max(len(values) - 1, 1)
        y = TOP + (HEIGHT - TOP - BOTTOM) * (high - value) / (high - low)
        return x, y

    pen.rectangle((LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM), outline="black")
    for exponent in range(math.floor(low), math.ceil(high) + 1):
        if low <= exponent <= high:
            y = point(0, exponent)[1]
            pen.line((LEFT, y, WIDTH - RIGHT, y), fill=(220, 220, 220))
            pen.text((5, y - 6), f"{10.0**exponent:g}", fill="black")
    pen.line([point(i, v) for i, v in enumerate(values)], fill=(180, 180, 180))
    pen.line(
        [point(i, v) for i, v in enumerate(smoothed(values))],
        fill=(30, 90, 200),
        width=2,
    )
    pen.text((LEFT, 12), f"{title} (log scale)", fill="black")
    pen.text((LEFT, HEIGHT - 35), "step 0", fill="black")
    pen.text((WIDTH - RIGHT - 80, HEIGHT - 35), f"step {len(values)}", fill="black")
    image.save(path)
