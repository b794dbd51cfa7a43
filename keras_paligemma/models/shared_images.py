"""Several prompts about one image: the image is encoded once.

`generate` accepts, besides one prompt per image:

- one image and a list of prompts: every prompt is about that image;
- a batch of N images and N lists of prompts (`[["caption en", "detect
  cat"], ["ocr"]]`): each list is about its image, and the answers come
  back grouped the same way.

The preprocessor converts each image once and packs the prompts flat, with
an `image_index` input that says which image each prompt row reads; the
model runs SigLIP once per image and gathers its tokens for every row.

What is shared is the image encoding (SigLIP and the projector), not the
decoder's KV cache of the image tokens: in PaliGemma's prefix, image tokens
attend to the prompt (full attention over image + prompt), so from the
second decoder layer on their keys and values depend on the prompt, and
reusing them across prompts would change the answers.
"""

import numpy as np

from keras_paligemma.models.image_converter import is_single_image


def prompt_groups(prompts):
    """The sizes of nested prompt lists, or `None` for flat prompts.

    >>> prompt_groups([["caption en", "ocr"], ["detect cat"]])
    [2, 1]
    >>> prompt_groups(["caption en", "ocr"]) is None
    True
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        return None
    nested = [isinstance(p, (list, tuple)) for p in prompts]
    if not any(nested):
        return None
    if not all(nested) or not all(prompts):
        raise ValueError(
            "`prompts` must be strings, or one non-empty list of prompts per "
            f"image; got {prompts!r}."
        )
    return [len(group) for group in prompts]


def count_images(images):
    """How many images (examples) a batch of `images` holds."""
    if is_single_image(images):
        return 1
    if hasattr(images, "shape"):
        return int(images.shape[0])
    return len(images)


def flatten_prompt_groups(x):
    """`x` with nested `prompts` (and `responses`) made flat.

    Returns the new dict, with an `image_index` array mapping each prompt
    row to its image, or `x` itself when the prompts are flat.
    """
    groups = prompt_groups(x["prompts"])
    if groups is None:
        return x
    images = count_images(x["images"])
    if len(groups) != images:
        raise ValueError(
            f"`prompts` holds {len(groups)} lists of prompts but `images` "
            f"holds {images} image(s); give one list per image."
        )
    flat = dict(x)
    flat["prompts"] = [p for group in x["prompts"] for p in group]
    if "responses" in x:
        if prompt_groups(x["responses"]) != groups:
            raise ValueError(
                "`responses` must be nested like `prompts` (one list per "
                f"image, of sizes {groups})."
            )
        flat["responses"] = [r for group in x["responses"] for r in group]
    flat["image_index"] = np.repeat(np.arange(images), groups).astype("int32")
    return flat


def regroup(outputs, groups):
    """Split a flat list of answers into lists of the given sizes.

    >>> regroup(["a", "b", "c"], [2, 1])
    [['a', 'b'], ['c']]
    """
    ends = np.cumsum(groups)
    return [list(outputs[end - size : end]) for size, end in zip(groups, ends)]
