"""PaliGemmaCausalLM: answer prompts about images, fine-tune, score."""

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_paligemma.layers.window_cache import window_rings
from keras_paligemma.models.backbone import PaliGemmaBackbone
from keras_paligemma.models.fit_inputs import FitInputs
from keras_paligemma.models.generate_compile import jax_generate_function
from keras_paligemma.models.generate_compile import prompt_bucket
from keras_paligemma.models.preprocessor import PaliGemmaCausalLMPreprocessor
from keras_paligemma.models.preset_dir import check_preset_dir
from keras_paligemma.models.shared_images import prompt_groups
from keras_paligemma.models.shared_images import regroup
from keras_paligemma.presets import PresetLoading
from keras_paligemma.models.task_methods import TaskMethods

@keras.saving.register_keras_serializable(package="keras_paligemma")
class PaliGemmaCausalLM(
    FitInputs, TaskMethods, PresetLoading, keras_hub.models.CausalLM
):
    """PaliGemma (1 or 2) for image + text to text generation.

    Calling the model on preprocessed inputs (`images`, `token_ids`,
    `padding_mask`, `response_mask`) returns the logits of the text
    positions, `(batch, text_length, vocabulary_size)`. `fit()` takes
    `{"images", "prompts", "responses"}` (the loss covers the answers only).

    `generate()` takes `{"images", "prompts"}` (optionally `"responses"` to
    force the start of the answer) and returns `prompt + answer` strings
    like keras-hub (`strip_prompt=True` returns the answer alone); a single
    image and prompt give a string, a batch a list. Several prompts about
    one image (a list of prompts with one image, or one list of prompts per
    image, answered in the same nesting) encode each image once. With
    `preprocessor=None` it takes and returns token ids. How it runs:

    - The image is encoded and the prefix (image + prompt) is prefilled
      once into a KV cache of `num_image_tokens + max_length` slots (the
      longest prompt plus the answer budget), then one token is decoded
      per step. Only the first `prompt_bucket(longest prompt)` text
      columns are prefilled, not the whole text buffer. The first answer
      token comes from the prefill itself (with keras-hub's plain sampler
      loop: greedy, top-k, top-p, random).
    - With a `sliding_window` shorter than the cache, the windowed layers
      decode from a ring of the last `sliding_window` positions
      (`window_cache.py`) instead of a slot per column.
    - Prompts of different lengths are right-aligned inside the cache
      (each row keeps its own positions), so every row of a batch gets
      exactly the tokens it gets alone, and the decode loop starts for all
      rows at the longest prompt. The answer budget is `max_length` (the
      packed text length) minus the longest prompt.
    - JAX: `jax.jit`; TensorFlow: `tf.function`, with XLA when
      `jit_compile` resolves to True (Keras' "auto" is False on CPU-only
      machines); PyTorch: eager under `torch.no_grad()`. One
      function is compiled per batch size, `max_length` and prompt bucket
      (1-32 tokens, 33-64, 65-128, ...): new prompt lengths inside a
      bucket do not recompile.
    - Greedy by default; any keras-hub sampler works
      (`causal_lm.compile(sampler="top_k")`).

    One-call tasks return structured results in pixels of the original
    images: `caption()`, `answer()`, `ocr()`, `detect()` (`Detection`s) and
    `segment()` (`Segmentation`s with masks, given a `MaskDecoder`).

    Args:
        backbone: a `PaliGemmaBackbone`.
        preprocessor: a `PaliGemmaCausalLMPreprocessor`, or `None` to work
            with token ids.

    Example:

    >>> import numpy as np
    >>> causal_lm = PaliGemmaCausalLM.from_preset(
    ...     "presets/pali_gemma_tiny_random")
    >>> answer = causal_lm.generate(
    ...     {"images": np.zeros((64, 64, 3), "uint8"),
    ...      "prompts": "caption en"}, max_length=12)
    >>> answer.startswith("caption en\\n")
    True
    """

    backbone_cls = PaliGemmaBackbone
    preprocessor_cls = PaliGemmaCausalLMPreprocessor
    preset_kind = "causal_lm"

    def __init__(self, backbone, preprocessor=None, **kwargs):
        images_per_example = getattr(preprocessor, "num_images", 1)
        if preprocessor is not None and images_per_example != backbone.num_images:
            raise ValueError(
                f"The preprocessor packs {images_per_example} image(s) per "
                f"example but the backbone takes {backbone.num_images}; set "
                "the same `num_images` on both."
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        **kwargs,
    ):
        """Configure `fit()` and `generate()`; greedy decoding by default.

        Same arguments as `keras_hub.models.CausalLM.compile`; only the
        sampler default differs (PaliGemma is evaluated greedily).
        """
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    def make_generate_function(self):
        """The generate function: bucketed prompts, compiled per bucket.

        Rebuilt when the variables change: `enable_lora()`, `merge_lora()`
        and freezing add, remove or move variables, and a function compiled
        before them would run the old model.

        Each call measures its longest prompt and passes the bucket
        (`prompt_bucket`) as the static `prefill_length` of
        `generate_step`, so only that many text columns are prefilled and
        new prompt lengths inside a bucket reuse the compiled function.
        """
        variables_now = tuple(
            (id(variable), variable.trainable) for variable in self.variables
        )
        if getattr(self, "_generate_variables", None) != variables_now:
            self.generate_function = None
            self._generate_variables = variables_now
        if self.generate_function is not None:
            return self.generate_function
        if keras.config.backend() == "jax" and not self.run_eagerly:
            compiled = jax_generate_function(self)
        else:
            compiled = super().make_generate_function()

        def generate_function(inputs, stop_token_ids=None):
            padding_mask = ops.convert_to_numpy(inputs["padding_mask"])
            longest = int(np.max(np.sum(padding_mask != 0, axis=-1)))
            bucket = prompt_bucket(longest, padding_mask.shape[-1])
            return compiled(
                {**inputs, "prefill_length": bucket},
                stop_token_ids=stop_token_ids,
            )

        self.generate_function = generate_function
        return generate_function

    def quantize(self, mode, **kwargs):
        """Quantize the backbone's weights in place: `"int8"`, `"int4"`, ...

        Through Keras (`keras.Model.quantize`; its `config=` argument is
        passed on): by default `"int8"` stores int8 kernels and embeddings
        and also quantizes each layer's inputs on the fly (per-token abs-max)
        for an int8 matmul. The preprocessor is left alone. int8 models save
        to and load from presets like float ones.
        """
        self.backbone.quantize(mode, **kwargs)
        self.train_function = self.test_function = None
        self.predict_function = None

    def generate_step(self, inputs, stop_token_ids=None):
        """Generate for one batch of preprocessed inputs.

        Args:
            inputs: dict with `images`, right-padded `token_ids` and
                `padding_mask` (and optionally `response_mask`, marking
                forced answer tokens, and `prefill_length`, a Python int
                at least as large as every prompt: only that many text
                columns are prefilled; without it, all of them are).
            stop_token_ids: tuple of ids that end a row, or `None`.

        Returns:
            dict with `token_ids` and `padding_mask` in the input layout:
            each row's prompt first, then its answer.
        """
        backbone = self.backbone
        token_ids = ops.convert_to_tensor(inputs["token_ids"], "int32")
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        response_mask = inputs.get("response_mask")
        if response_mask is None:
            response_mask = ops.zeros_like(padding_mask)
        response_mask = ops.cast(response_mask, "bool")
        images = ops.convert_to_tensor(inputs["images"])
        if len(images.shape) == 3 + (backbone.num_images > 1):
            images = ops.expand_dims(images, 0)
        image_mask = inputs.get("image_mask")
        batch_size, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        # Several prompts per image: each image is encoded once, and every
        # prompt row reads its image's tokens (`image_index`; one image for
        # a whole batch of prompts needs no index). Batch sizes unknown at
        # trace time (a serving signature) are one image per prompt.
        image_index = inputs.get("image_index")
        image_rows = ops.shape(images)[0]
        static = isinstance(image_rows, int) and isinstance(batch_size, int)
        if image_index is None and static and image_rows != batch_size:
            if image_rows != 1:
                raise ValueError(
                    f"`images` holds {image_rows} images for {batch_size} "
                    "prompts; give one image per prompt, one image for "
                    "all, or an `image_index` per prompt."
                )
            image_index = ops.zeros((batch_size,), "int32")
        if image_index is not None and image_mask is not None:
            image_mask = ops.take(image_mask, image_index, axis=0)
        num_image_tokens = backbone.num_image_tokens

        # Right-align the prompts: row b moves right by `shift[b]` so every
        # prompt ends at column `prompt_end`, where decoding starts.
        lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=1)
        prompt_end = ops.max(lengths)
        shift = prompt_end - lengths
        columns = ops.expand_dims(ops.arange(length, dtype="int32"), 0)
        source = columns - ops.expand_dims(shift, 1)
        in_prompt = ops.logical_and(source >= 0, columns < prompt_end)
        gather = ops.clip(source, 0, length - 1)
        prompt = ops.where(
            in_prompt, ops.take_along_axis(token_ids, gather, axis=1), 0
        )
        text_response = ops.where(
            in_prompt,
            ops.take_along_axis(response_mask, gather, axis=1),
            columns >= prompt_end,
        )
        # Positions count valid tokens, so each row keeps its own numbering.
        valid, response, positions = backbone.sequence_layout(
            source >= 0, text_response, image_mask
        )

        # Prefill: encode the image once, fill the cache with the prefix.
        # Columns past the prompts are left empty (masked) for the answer.
        prefill_length = inputs.get("prefill_length") or length
        image_tokens = backbone.encode_images(images)
        if image_index is not None:
            image_tokens = ops.take(image_tokens, image_index, axis=0)
        x = ops.concatenate(
            [image_tokens, backbone.embed_tokens(prompt[:, :prefill_length])],
            axis=1,
        )
        cache_shape = (
            batch_size,
            2,
            num_image_tokens + length,
            backbone.num_key_value_heads,
            backbone.head_dim,
        )
        cache = tuple(
            ops.zeros(cache_shape, dtype=self.compute_dtype)
            for _ in range(backbone.num_layers)
        )
        # Samplers that run keras-hub's plain loop (greedy, top-k, top-p,
        # random) take the first answer token from the prefill, instead of
        # running the decoder over the last prompt token again; then only
        # that row of the last block's feed-forward is needed. Beam and
        # contrastive search run their own loops, which start there;
        # contrastive search also compares the prompt's hidden states.
        plain_loop = (
            type(self.sampler).__call__ is keras_hub.samplers.Sampler.__call__
        )
        compares_hidden_states = isinstance(
            self.sampler, keras_hub.samplers.ContrastiveSampler
        )
        last_column = num_image_tokens + prompt_end - 1
        hidden_states, cache = backbone.decode(
            x,
            valid,
            response,
            positions,
            cache,
            0,
            output_index=None if compares_hidden_states else last_column,
        )
        index = prompt_end
        if plain_loop:
            logits = backbone.token_embedding(hidden_states, reverse=True)
            first = self.sampler.get_next_token(
                self.sampler.compute_probabilities(logits[:, 0, :])
            )
            prompt = ops.where(
                columns == prompt_end, ops.cast(first, "int32")[:, None], prompt
            )
            index = ops.minimum(prompt_end + 1, length)
            # Decode steps now only run answer tokens, which see no further
            # back than the sliding window: those layers keep a ring of it.
            last_position = ops.slice(
                positions, [0, last_column], [batch_size, 1]
            )
            cache = window_rings(
                cache, backbone.sliding_window, positions, last_position[:, 0]
            )
        if compares_hidden_states:
            # The prompts' hidden states; the unfilled columns stay zero.
            hidden_states = ops.pad(
                hidden_states[:, num_image_tokens:],
                [[0, 0], [0, length - prefill_length], [0, 0]],
            )

        def next(prompt, cache, index):
            # Beam and contrastive samplers repeat each row (`ops.repeat`
            # on axis 0) into several candidates; the layout follows.
            rows = ops.shape(prompt)[0]
            layout = [valid, response, positions]
            if isinstance(rows, int) and rows != batch_size:
                copies = rows // batch_size
                layout = [ops.repeat(t, copies, axis=0) for t in layout]
            token = ops.slice(prompt, [0, index - 1], [rows, 1])
            hidden_states, cache = backbone.decode(
                backbone.embed_tokens(token),
                *layout,
                cache,
                num_image_tokens + index - 1,
            )
            logits = backbone.token_embedding(hidden_states, reverse=True)
            return logits[:, 0, :], hidden_states[:, 0, :], cache

        generated = self.sampler(
            next=next,
            prompt=prompt,
            cache=cache,
            index=index,
            hidden_states=hidden_states if compares_hidden_states else None,
            mask=in_prompt,
            stop_token_ids=stop_token_ids,
            model=self,
        )

        keep = source >= 0
        if stop_token_ids is not None:
            is_stop = ops.zeros_like(in_prompt)
            for stop_id in stop_token_ids:
                is_stop = ops.logical_or(is_stop, ops.equal(generated, stop_id))
            is_stop = ops.cast(
                ops.logical_and(is_stop, ops.logical_not(in_prompt)), "int32"
            )
            stops_before = ops.cumsum(is_stop, axis=1) - is_stop
            keep = ops.logical_and(keep, stops_before == 0)

        # Move every row back to the left, as the input was laid out.
        back = columns + ops.expand_dims(shift, 1)
        inside = back < length
        back = ops.clip(back, 0, length - 1)
        return {
            "token_ids": ops.where(
                inside, ops.take_along_axis(generated, back, axis=1), 0
            ),
            "padding_mask": ops.logical_and(
                inside, ops.take_along_axis(keep, back, axis=1)
            ),
        }

    def generate(
        self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False
    ):
        """Generate answers; see the class docstring and keras-hub's.

        With a preprocessor, `inputs["prompts"]` may also hold one list of
        prompts per image; the answers then come back as one list per
        image, and each image is encoded once (`shared_images`).
        """
        groups = None
        if self.preprocessor is not None and isinstance(inputs, dict):
            groups = prompt_groups(inputs.get("prompts"))
        outputs = super().generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )
        return outputs if groups is None else regroup(outputs, groups)

    def save_to_preset(self, preset_dir, max_shard_size=10, overwrite=False):
        """Save model, preprocessor and tokenizer as a loadable preset.

        Args:
            preset_dir: directory to write; it must be missing or empty
                unless `overwrite=True`.
            max_shard_size: weights shard size in GB.
            overwrite: replace the files of an existing preset.
        """
        check_preset_dir(preset_dir, overwrite)
        # keras-hub's saver writes task.json, then calls the backbone's
        # `save_to_preset` on the same, now non-empty, directory.
        self.backbone._saving_inside_task = True
        try:
            super().save_to_preset(preset_dir, max_shard_size=max_shard_size)
        finally:
            self.backbone._saving_inside_task = False
