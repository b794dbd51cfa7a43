"""One-call PaliGemma tasks: caption, answer, ocr, detect, segment, score.

`PaliGemmaCausalLM` inherits these. Each builds the task prompt, runs
`generate()` on the whole batch and returns structured results; boxes and
masks are in pixels of the ORIGINAL images. `score` returns the logits or
losses of given answers.
"""

import dataclasses

import keras
from keras import ops

from keras_paligemma.models.image_converter import is_single_image
from keras_paligemma.models.image_converter import load_image
from keras_paligemma.outputs.detection import parse_detections
from keras_paligemma.outputs.segmentation import parse_segmentations


@dataclasses.dataclass(frozen=True)
class Answer:
    """A text answer: the prompt the model saw and what it wrote."""

    prompt: str
    text: str


class TaskMethods:
    """Mixin of task helpers built on `generate()`.

    Every method takes one image (path, PIL image or array) or a list of
    them, and returns one result or a list of results accordingly.
    """

    def _normalize_generate_inputs(self, inputs):
        # keras-hub wraps single strings in place; never touch the caller's dict.
        if isinstance(inputs, dict):
            inputs = dict(inputs)
        return super()._normalize_generate_inputs(inputs)

    def caption(self, images, lang="en", max_length=None):
        """Caption each image: the `caption {lang}` prompt."""
        return self._ask(images, f"caption {lang}", max_length)

    def answer(self, images, questions, lang="en", max_length=None):
        """Answer a question per image: `answer {lang} {question}`.

        `questions` is one string (asked of every image) or one per image.
        With one image, a list of questions asks them all of that image,
        which is encoded once, and returns one `Answer` per question.
        """
        if is_single_image(images) and not isinstance(questions, str):
            prompts = [f"answer {lang} {question}" for question in questions]
            texts = self._answers(_load_all(images), [prompts], max_length)
            return [Answer(p, t) for p, t in zip(prompts, texts[0])]
        prompts = [
            f"answer {lang} {question}"
            for question in _per_image(questions, images, "questions")
        ]
        return self._ask(images, prompts, max_length)

    def ocr(self, images, max_length=None):
        """Read the text in each image: the `ocr` prompt."""
        return self._ask(images, "ocr", max_length)

    def detect(self, images, objects, max_length=None):
        """Detect objects: `detect a ; b`, parsed into `Detection`s.

        Args:
            images: one image or a list.
            objects: a name (`"cat"`) or a list of names (`["cat", "dog"]`)
                looked for in every image.

        Returns:
            A list of `Detection` per image (boxes in original pixels).
        """
        if isinstance(objects, str):
            objects = [objects]
        prompt = "detect " + " ; ".join(objects)
        return self._parsed(
            images, prompt, max_length,
            lambda text, size: parse_detections(text, size),
        )

    def segment(self, images, object_name, decoder=None, max_length=None):
        """Segment one kind of object: `segment {object_name}`.

        Args:
            images: one image or a list.
            object_name: what to segment, e.g. `"cat"`.
            decoder: a `MaskDecoder` to turn codes into masks, or `None`
                for boxes and codes only.

        Returns:
            A list of `Segmentation` per image.
        """
        return self._parsed(
            images, f"segment {object_name}", max_length,
            lambda text, size: parse_segmentations(text, size, decoder),
        )

    def _ask(self, images, prompts, max_length):
        single = is_single_image(images)
        loaded = _load_all(images)
        prompts = _per_image(prompts, loaded, "prompts")
        texts = self._answers(loaded, prompts, max_length)
        answers = [Answer(p, t) for p, t in zip(prompts, texts)]
        return answers[0] if single else answers

    def _parsed(self, images, prompt, max_length, parse):
        single = is_single_image(images)
        loaded = _load_all(images)
        texts = self._answers(loaded, [prompt] * len(loaded), max_length)
        results = [
            parse(text, image.shape[:2]) for text, image in zip(texts, loaded)
        ]
        return results[0] if single else results

    def _answers(self, images, prompts, max_length):
        if self.preprocessor is None:
            raise ValueError("Task helpers need a `preprocessor`.")
        return self.generate(
            {"images": images, "prompts": prompts},
            max_length=max_length,
            strip_prompt=True,
        )

    def score(
        self,
        images,
        token_ids,
        padding_mask=None,
        response_mask=None,
        scoring_mode="logits",
        target_ids=None,
        image_mask=None,
    ):
        """Per-token logits or losses of given text for given images.

        Args:
            images: preprocessed images `(batch, size, size, 3)`.
            token_ids: `(batch, length)` text tokens.
            padding_mask: `(batch, length)`, defaults to all ones.
            response_mask: `(batch, length)` answer tokens (causal); defaults
                to none (the whole text is prefix).
            scoring_mode: `"logits"` for `(batch, length, vocabulary)`
                logits, or `"loss"` for the per-token cross-entropy against
                `target_ids`.
            target_ids: `(batch, length)` targets, required for `"loss"`.
            image_mask: `(batch, num_images)` for multi-image backbones;
                defaults to every image present.
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(
                "`scoring_mode` must be 'logits' or 'loss'; got "
                f"{scoring_mode!r}."
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError("`target_ids` is required when scoring 'loss'.")
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        if response_mask is None:
            response_mask = ops.zeros_like(token_ids)
        inputs = {
            "images": images,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": response_mask,
        }
        if self.backbone.num_images > 1:
            if image_mask is None:
                image_mask = ops.ones(
                    (ops.shape(token_ids)[0], self.backbone.num_images), "int32"
                )
            inputs["image_mask"] = image_mask
        logits = self({k: ops.convert_to_tensor(v) for k, v in inputs.items()})
        if scoring_mode == "logits":
            return logits
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None
        )
        return loss(target_ids, logits)


def _load_all(images):
    if is_single_image(images):
        images = [images]
    return [load_image(image) for image in images]


def _per_image(values, images, argument):
    count = 1 if is_single_image(images) else len(images)
    if isinstance(values, str):
        return [values] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(
            f"`{argument}` must be one string or one per image ({count}); "
            f"got {len(values)}."
        )
    return values
