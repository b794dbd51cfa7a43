"""Export PaliGemma as a TensorFlow SavedModel for TF Serving / Vertex AI.

The exported `serving_default` signature takes encoded image bytes and
prompts and returns the answers. Image decoding, resizing, tokenization,
the KV-cached decode loop and detokenization all run inside the graph, so
serving needs TensorFlow and TensorFlow Text and no Python code of ours.

The graph is built with the TensorFlow backend in a fresh process: the
model (on any backend) is saved as a preset into a temporary directory,
re-created under `KERAS_BACKEND=tensorflow` by `python -m
keras_paligemma.export`, and written from there. The weights are the same
numbers, and nothing but the model's weights (no optimizer state) ends up
in the SavedModel.

Example:

    import keras_paligemma as kp

    causal_lm = kp.PaliGemmaCausalLM.from_preset("presets/pali_gemma_tiny_random")
    kp.export_saved_model(causal_lm, "exported/paligemma", max_length=32)

    # In the server (no keras, no keras_paligemma):
    import tensorflow as tf, tensorflow_text  # noqa: F401 (registers ops)
    serve = tf.saved_model.load("exported/paligemma").signatures["serving_default"]
    out = serve(images=tf.constant([open("cat.jpg", "rb").read()]),
                prompts=tf.constant(["caption en"]))
    out["text"]       # the strings `generate()` returns
    out["token_ids"]  # int32 (batch, max_length), 0 past each answer
"""

import os
import subprocess
import sys
import tempfile

import keras

from keras_paligemma.models.image_converter import decode_encoded_images
from keras_paligemma.models.preset_dir import check_preset_dir


def export_saved_model(causal_lm, path, max_length=None, overwrite=False):
    """Write a SavedModel whose `serving_default` answers prompts on images.

    Signature inputs: `images` (`tf.string`, `[batch]`, encoded JPEG, PNG,
    GIF or BMP bytes of any size) and `prompts` (`tf.string`, `[batch]`).
    Outputs: `text` (`tf.string`, `[batch]`: prompt + answer, exactly what
    `causal_lm.generate()` returns) and `token_ids` (`int32`,
    `[batch, max_length]`, prompt and answer tokens, 0 elsewhere).

    Args:
        causal_lm: a `PaliGemmaCausalLM` with a preprocessor, on any backend.
        path: directory to write; it must be missing or empty unless
            `overwrite=True`.
        max_length: packed text length (prompt + answer tokens); defaults to
            the preprocessor's `sequence_length`.
        overwrite: replace an existing export.
    """
    if causal_lm.preprocessor is None:
        raise ValueError(
            "`causal_lm` needs a preprocessor to be exported: the SavedModel "
            "tokenizes prompts and decodes images itself."
        )
    if max_length is not None and (
        not isinstance(max_length, int) or max_length < 2
    ):
        raise ValueError(
            f"`max_length` must be an int of at least 2; got {max_length!r}."
        )
    check_preset_dir(path, overwrite)
    options = [] if max_length is None else ["--max-length", str(max_length)]
    _export_in_tensorflow_process(causal_lm, path, options)


def export_backbone(backbone, path, overwrite=False):
    """Write the raw backbone forward pass as a SavedModel (`model.export`).

    For users who run their own decode loop. The `serve` endpoint takes the
    backbone's inputs (`images` float32 `[batch, size, size, 3]` in
    `[-1, 1]`, `token_ids`, `padding_mask`, `response_mask` int32
    `[batch, length]`) and returns the text hidden states
    `[batch, length, hidden_dim]`; multiply by the token embedding
    (`backbone.token_embedding.embeddings`) for logits.

    Args:
        backbone: a `PaliGemmaBackbone`, on any backend.
        path: directory to write; it must be missing or empty unless
            `overwrite=True`.
        overwrite: replace an existing export.
    """
    check_preset_dir(path, overwrite)
    _export_in_tensorflow_process(backbone, path, ["--backbone"])


def _export_in_tensorflow_process(model, path, options):
    """Save `model` as a preset, re-create and export it under TensorFlow."""
    with tempfile.TemporaryDirectory() as directory:
        preset = os.path.join(directory, "preset")
        model.save_to_preset(preset)
        command = [sys.executable, "-m", "keras_paligemma.export", preset]
        environment = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        result = subprocess.run(
            command + [path] + options,
            env=environment,
            capture_output=True,
            text=True,
        )
    if result.returncode:
        raise RuntimeError(
            "Exporting under the TensorFlow backend failed:\n"
            + result.stderr[-4000:]
        )


def write_saved_model(causal_lm, path, max_length=None):
    """Trace and write the serving SavedModel (TensorFlow backend only)."""
    import tensorflow as tf

    if keras.config.backend() != "tensorflow":
        raise RuntimeError("`write_saved_model` needs KERAS_BACKEND=tensorflow.")
    module = _ServingModule(causal_lm, max_length)
    signature = module.serve.get_concrete_function()
    tf.saved_model.save(
        module, path, signatures={"serving_default": signature}
    )


class _ServingModule(keras.layers.Layer):
    """Holds the model and the traced serving function."""

    def __init__(self, causal_lm, max_length):
        import tensorflow as tf

        super().__init__()
        self.causal_lm = causal_lm
        preprocessor = causal_lm.preprocessor
        converter = preprocessor.image_converter
        size = tuple(converter.image_size)
        length = max_length or preprocessor.sequence_length
        tokenizer = preprocessor.tokenizer
        strip_ids = sorted(tokenizer.special_token_ids)
        stop_ids = (tokenizer.end_token_id,)

        @tf.function(
            input_signature=[
                tf.TensorSpec([None], tf.string, name="images"),
                tf.TensorSpec([None], tf.string, name="prompts"),
            ]
        )
        def serve(images, prompts):
            pixels = decode_encoded_images(images, size)
            x = preprocessor.generate_preprocess(
                {"images": pixels, "prompts": prompts}, sequence_length=length
            )
            out = causal_lm.generate_step(x, stop_token_ids=stop_ids)
            token_ids = tf.cast(out["token_ids"], tf.int32)
            keep = tf.cast(out["padding_mask"], tf.bool)
            shown = keep
            for special in strip_ids:
                shown = shown & tf.not_equal(token_ids, special)
            text = tokenizer.detokenize(tf.ragged.boolean_mask(token_ids, shown))
            return {
                "text": text,
                "token_ids": tf.where(keep, token_ids, tf.zeros_like(token_ids)),
            }

        self.serve = serve
