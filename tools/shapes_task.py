"""The synthetic *shapes* task: coloured shapes on a plain background.

Each image is split into a 2 x 2 grid of cells; one or two shapes (a
circle, a square or a triangle, each kind at most once) fill cells of
their own, each in one of four colours. Every example is one of three
PaliGemma-style tasks about its image:

- `caption en` -> `a red circle and a blue square` (shapes in reading
  order: top-left, top-right, bottom-left, bottom-right);
- `answer en what color is the square?` -> `blue`;
- `detect circle` -> `<loc0032><loc0544><loc0480><loc0992> circle` (the box
  as `y_min x_min y_max x_max` in 1024 bins, as PaliGemma writes it).

Examples are generated on the fly from a seed, so a training set and a
held-out set never share an image unless they share a seed.

>>> import numpy as np
>>> example = make_example(np.random.default_rng(0), "caption")
>>> example["image"].shape, example["prompt"]
((112, 112, 3), 'caption en')
>>> example["response"] in set(all_captions())
True
"""

import itertools

import numpy as np
from PIL import Image
from PIL import ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
TASKS = ("caption", "color", "detect")
IMAGE_SIZE = 112
LOCATION_BINS = 1024
MARGIN = 0.125  # of a cell, on every side of a shape's box


def cell_box(cell, image_size=IMAGE_SIZE):
    """Pixel box `(x_min, y_min, x_max, y_max)` of the shape in `cell`.

    Cells are numbered in reading order: 0 top-left ... 3 bottom-right.
    """
    half = image_size / 2
    x0, y0 = (cell % 2) * half, (cell // 2) * half
    inset = MARGIN * half
    return (x0 + inset, y0 + inset, x0 + half - inset, y0 + half - inset)


def location_tokens(box, image_size=IMAGE_SIZE):
    """`<loc####>` tokens `y_min x_min y_max x_max` of a pixel box."""
    x_min, y_min, x_max, y_max = box
    values = [y_min, x_min, y_max, x_max]
    bins = [min(int(round(v / image_size * LOCATION_BINS)), 1023) for v in values]
    return "".join(f"<loc{b:04d}>" for b in bins)


def draw(objects, image_size=IMAGE_SIZE, background=(255, 255, 255)):
    """An RGB uint8 image of `objects`: `(shape, colour, cell)` triples."""
    scale = 2  # draw large, then downsample: smooth edges
    canvas = Image.new("RGB", (image_size * scale,) * 2, background)
    pen = ImageDraw.Draw(canvas)
    for shape, color, cell in objects:
        x0, y0, x1, y1 = (v * scale for v in cell_box(cell, image_size))
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    canvas = canvas.resize((image_size, image_size), Image.LANCZOS)
    return np.asarray(canvas)


def caption(objects):
    """`a red circle and a blue square`, in reading order of the cells."""
    ordered = sorted(objects, key=lambda obj: obj[2])
    return " and ".join(f"a {color} {shape}" for shape, color, _ in ordered)


def all_captions():
    """Every caption the task can produce (for chance-level arithmetic)."""
    captions = []
    for count in (1, 2):
        for shapes in itertools.permutations(SHAPES, count):
            for colors in itertools.product(COLORS, repeat=count):
                captions.append(
                    caption([(s, c, i) for i, (s, c) in enumerate(zip(shapes, colors))])
                )
    return captions


def random_objects(rng):
    """One or two `(shape, colour, cell)` triples with distinct shapes."""
    count = int(rng.integers(1, 3))
    shapes = rng.choice(SHAPES, size=count, replace=False)
    cells = rng.choice(4, size=count, replace=False)
    colors = rng.choice(list(COLORS), size=count)
    return [
        (str(shape), str(color), int(cell))
        for shape, color, cell in zip(shapes, colors, cells)
    ]


def make_example(rng, task=None, image_size=IMAGE_SIZE):
    """One example: `image`, `prompt`, `response`, `task` and `objects`.

    Args:
        rng: a `numpy.random.Generator`.
        task: `"caption"`, `"color"`, `"detect"` or `None` (uniform).
        image_size: side of the square image in pixels.
    """
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS} or None; got {task!r}.")
    objects = random_objects(rng)
    shape, color, cell = objects[int(rng.integers(len(objects)))]
    if task == "caption":
        prompt, response = "caption en", caption(objects)
    elif task == "color":
        prompt, response = f"answer en what color is the {shape}?", color
    else:
        box = cell_box(cell, image_size)
        prompt = f"detect {shape}"
        response = f"{location_tokens(box, image_size)} {shape}"
    return {
        "image": draw(objects, image_size),
        "prompt": prompt,
        "response": response,
        "task": task,
        "objects": objects,
    }


def make_dataset(num_examples, seed, tasks=TASKS, image_size=IMAGE_SIZE):
    """`{"images", "prompts", "responses"}` plus the `tasks` and `objects`.

    `images` is a uint8 array `(num_examples, image_size, image_size, 3)`;
    the tasks cycle through `tasks` so every task gets its share.
    """
    rng = np.random.default_rng(seed)
    examples = [
        make_example(rng, tasks[i % len(tasks)], image_size)
        for i in range(num_examples)
    ]
    return {
        "images": np.stack([e["image"] for e in examples]),
        "prompts": [e["prompt"] for e in examples],
        "responses": [e["response"] for e in examples],
        "tasks": [e["task"] for e in examples],
        "objects": [e["objects"] for e in examples],
    }


def box_iou(box_a, box_b):
    """Intersection over union of two `(x_min, y_min, x_max, y_max)` boxes."""
    width = min(box_a[2], box_b[2]) - max(box_a[0], box_b[0])
    height = min(box_a[3], box_b[3]) - max(box_a[1], box_b[1])
    inter = max(width, 0) * max(height, 0)
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])  # noqa: E731
    union = area(box_a) + area(box_b) - inter
    return inter / union if union > 0 else 0.0


def score(dataset, answers):
    """Held-out metrics of `answers` (one string per example, no prompt).

    Returns `{"caption": exact-match accuracy, "color": exact-match
    accuracy, "detect": mean IoU of the first box with the true box}`, over
    the examples of each task present in `dataset`.
    """
    from keras_paligemma.outputs.detection import parse_detections

    totals = {}
    for i, answer in enumerate(answers):
        task, target = dataset["tasks"][i], dataset["responses"][i]
        if task == "detect":
            size = dataset["images"].shape[1:3]
            shape = target.split()[-1]
            cell = next(c for s, _, c in dataset["objects"][i] if s == shape)
            found = parse_detections(answer, size)
            value = box_iou(found[0].box, cell_box(cell, size[0])) if found else 0.0
        else:
            value = float(answer.strip() == target)
        totals.setdefault(task, []).append(value)
    return {task: float(np.mean(values)) for task, values in totals.items()}
