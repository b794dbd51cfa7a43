"""The models `tools/benchmark.py` times: ours and its peers, same weights.

keras-hub's PaliGemma gets our weights through the inverse of our
keras-hub converter, transformers' through our transformers exporter, so
all models compute the same function and greedy tokens can be compared.
"""

import os
import sys
import tempfile

import h5py
import keras
import keras_hub
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_paligemma import PaliGemmaBackbone  # noqa: E402
from keras_paligemma import PaliGemmaCausalLM  # noqa: E402
from keras_paligemma.checkpoints.keras_hub import keras_hub_config  # noqa: E402
from keras_paligemma.checkpoints.keras_hub import our_variable  # noqa: E402
from keras_paligemma.checkpoints.transformers_export import (  # noqa: E402
    export_transformers,
)
from keras_paligemma.layers.kernel_layout import to_input_first  # noqa: E402


def random_backbone(config, seed):
    """Our backbone with random weights, norm scales randomised too."""
    keras.utils.set_random_seed(seed)
    backbone = PaliGemmaBackbone(**config, dtype="float32")
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("scale"):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return backbone


def variant_causal_lm(backbone, variant):
    """Our causal LM with `backbone`'s weights in `"bfloat16"` or `"int8"`.

    int8 is Keras' int8 quantization (`causal_lm.quantize`) of a
    float32 copy; bfloat16 is a bfloat16 model given the same values.
    """
    dtype = "bfloat16" if variant == "bfloat16" else "float32"
    copy = PaliGemmaBackbone.from_config(
        {**backbone.get_config(), "dtype": dtype, "name": f"{variant}_backbone"}
    )
    for mine, theirs in zip(copy.weights, backbone.weights):
        # A real copy: an assigned same-dtype array would share its buffer,
        # and quantizing frees the float kernels (the original's too).
        mine.assign(np.array(keras.ops.convert_to_numpy(theirs)))
    causal_lm = PaliGemmaCausalLM(copy)
    if variant == "int8":
        causal_lm.quantize("int8")
    return causal_lm


def keras_hub_causal_lm(backbone):
    """keras-hub's `PaliGemmaCausalLM` holding the weights of `backbone`.

    Our keras-hub converter maps each dataset of a keras-hub weights file
    to our variable; this writes our values into such a file (inverting
    the converter's reshapes and transposes) and loads it into keras-hub.
    """
    config = backbone.get_config()
    theirs = keras_hub.models.PaliGemmaBackbone(
        **keras_hub_config(config), dtype="float32"
    )
    ours = {v.path: v for v in backbone.weights}

    def value_for(name, shape):
        stand_in = np.broadcast_to(np.int32(0), shape)
        path, mapped = our_variable(name, stand_in, config)
        value = to_input_first(path, keras.ops.convert_to_numpy(ours[path]))
        if mapped is stand_in:  # Stored as is.
            return value
        positions = np.arange(int(np.prod(shape))).reshape(shape)
        _, positions = our_variable(name, positions, config)
        out = np.empty(positions.size, value.dtype)
        out[positions.ravel()] = value.ravel()
        return out.reshape(shape)

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.weights.h5")
        theirs.save_weights(path)
        with h5py.File(path, "r+") as f:
            names = []
            f.visititems(lambda name, item: names.append(name)
                         if isinstance(item, h5py.Dataset) else None)
            for name in names:
                f[name][...] = value_for(name, f[name].shape)
        theirs.load_weights(path)
    return keras_hub.models.PaliGemmaCausalLM(backbone=theirs, preprocessor=None)


def transformers_model(backbone):
    """transformers' model with the weights of `backbone` (our exporter)."""
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as directory:
        export_transformers(backbone, directory, overwrite=True)
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32
        )
    return model.eval()


class KerasRunner:
    """Times a Keras `CausalLM` (ours or keras-hub's) on token inputs."""

    def __init__(self, name, causal_lm):
        self.name, self.causal_lm, self.traces = name, causal_lm, 0
        step = causal_lm.generate_step

        def counting_step(inputs, stop_token_ids=None):
            self.traces += 1
            return step(inputs, stop_token_ids)

        causal_lm.generate_step = counting_step
        causal_lm.compile(sampler="greedy")  # Also drops compiled functions.

    @property
    def compilations(self):
        return 0 if keras.config.backend() == "torch" else self.traces

    def prefill(self, images, prompts):
        """The logits of the prompt, as numpy float32."""
        ones = np.ones_like(prompts)
        logits = self.causal_lm.predict_on_batch({
            "images": images, "token_ids": prompts, "padding_mask": ones,
            "response_mask": np.zeros_like(prompts),
        })
        return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))

    def generate(self, images, prompts, new_tokens, stop_token_ids=None):
        batch, length = prompts.shape
        token_ids = np.zeros((batch, length + new_tokens), "int32")
        token_ids[:, :length] = prompts
        out = self.causal_lm.generate(
            {"images": images, "token_ids": token_ids,
             "padding_mask": token_ids != 0},
            stop_token_ids=stop_token_ids,
        )
        return np.asarray(out["token_ids"])[:, length:]

    def first_token(self, images, prompts, new_tokens, first):
        """`generate` with room for `new_tokens` that stops after the
        first: `first` (each row's first greedy token) are its stop tokens.
        A Keras `generate` prefills the whole buffer (ours: its prompt
        bucket, up to the buffer), so this first token costs what the first
        of `new_tokens` does, which `generate(..., 1)` does not."""
        stop = tuple(sorted({int(token) for token in first}))
        return self.generate(images, prompts, new_tokens, stop)


class TransformersRunner:
    """Times transformers' PaliGemma (eager torch, `no_grad`)."""

    name, compilations = "transformers", 0

    def __init__(self, model, num_image_tokens):
        self.model, self.num_image_tokens = model, num_image_tokens

    def _inputs(self, images, prompts):
        prompts = prompts[:, prompts.any(axis=0)]  # Drop padding columns.
        image_ids = np.full(
            (len(prompts), self.num_image_tokens),
            self.model.config.image_token_index,
        )
        input_ids = torch.tensor(np.concatenate([image_ids, prompts], axis=1))
        return {
            "input_ids": input_ids,
            "pixel_values": torch.tensor(images.transpose(0, 3, 1, 2)),
            "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids),
        }

    def prefill(self, images, prompts):
        """Runs the forward pass; returns `None` (drift is not compared)."""
        with torch.no_grad():
            self.model(**self._inputs(images, prompts),
                       logits_to_keep=prompts.shape[1])

    def generate(self, images, prompts, new_tokens):
        inputs = self._inputs(images, prompts)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        return out[:, inputs["input_ids"].shape[1]:].numpy()

    def first_token(self, images, prompts, new_tokens, first):
        """One new token: transformers prefills the prompt alone, whatever
        `max_new_tokens` is, so the first of `new_tokens` costs this."""
        return self.generate(images, prompts, 1)
