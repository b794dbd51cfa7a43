"""PaliGemmaBackbone: SigLIP encoder + projector + Gemma / Gemma 2 decoder."""

import keras
import keras_hub
from keras import ops

from keras_paligemma.layers.attention_mask import prefix_lm_attention_mask
from keras_paligemma.layers.decoder_block import DecoderBlock
from keras_paligemma.layers.rms_norm import RMSNormalization
from keras_paligemma.layers.reversible_embedding import ReversibleEmbedding
from keras_paligemma.layers.sublayer_call import call_sublayer
from keras_paligemma.layers.vision_encoder import VisionEncoder
from keras_paligemma.layers.window_cache import holds_window_rings
from keras_paligemma.layers.window_cache import ring_mask_and_slots
from keras_paligemma.models.fine_tuning import FineTuning
from keras_paligemma.models.kernel_layout_config import KernelLayoutConfig
from keras_paligemma.models.preset_dir import check_preset_dir
from keras_paligemma.models.preset_dir import refuse_int4
from keras_paligemma.presets import PresetLoading


@keras.saving.register_keras_serializable(package="keras_paligemma")
class PaliGemmaBackbone(
    FineTuning, PresetLoading, KernelLayoutConfig, keras_hub.models.Backbone
):
    """The PaliGemma (1 and 2) network, from pixels and tokens to hidden states.

    The image is encoded into `num_image_tokens` embeddings, which are put
    before the text embeddings (scaled by `sqrt(hidden_dim)`); the decoder
    runs with the prefix-LM mask (full attention over image and prompt,
    causal over the response); the output is the final-normed hidden state
    of the *text* positions, `(batch, text_length, hidden_dim)`.

    PaliGemma 1 uses a Gemma decoder (the defaults); PaliGemma 2 a Gemma 2
    decoder: `use_post_norms=True`, `attention_logit_softcap=50`,
    `final_logit_softcap=30`, `query_pre_attn_scalar` from the model size,
    and optionally `sliding_window` on even layers.

    Args:
        vocabulary_size: tokens in the vocabulary (257,152 for PaliGemma).
        image_size: side of the square input image (224, 448 or 896).
        num_layers: decoder blocks.
        num_query_heads: decoder query heads.
        num_key_value_heads: decoder key/value heads.
        hidden_dim: decoder width.
        ffw_hidden_dim: width of each of the gate and up projections of the
            GeGLU feed-forward (HF's `intermediate_size`; keras-hub's
            `intermediate_dim` is twice this).
        head_dim: decoder head width.
        vit_patch_size, vit_num_heads, vit_hidden_dim, vit_num_layers,
        vit_intermediate_dim: SigLIP sizes (So400m/14 by default).
        num_images: images per example. Above 1 (NLVR2-style checkpoints),
            `images` is `(batch, num_images, size, size, 3)` and an
            `image_mask` input `(batch, num_images)` marks missing images,
            whose tokens are never attended.
        query_pre_attn_scalar: queries are scaled by its inverse square
            root; defaults to `head_dim`.
        use_post_norms: Gemma 2's post-attention and post-FFW RMSNorms.
        attention_logit_softcap: `None` or the attention score soft-cap.
        final_logit_softcap: `None` or the output logit soft-cap.
        sliding_window: `None` (full attention everywhere, as PaliGemma 2
            was trained) or a window size applied to layers 0, 2, 4, ...
            (HF transformers uses 4096).
        layer_norm_epsilon: RMSNorm epsilon of the decoder.
        rope_max_wavelength: RoPE base.
        dtype: dtype policy, e.g. `"float32"`, `"bfloat16"`,
            `"mixed_bfloat16"`.
        lora: `None`, or `enable_lora` arguments (`rank`, `lora_alpha`,
            `targets`) to build the backbone with LoRA adapters, as a
            saved LoRA preset does.

    Example:

    >>> import numpy as np
    >>> backbone = PaliGemmaBackbone(
    ...     vocabulary_size=64, image_size=28, num_layers=2,
    ...     num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
    ...     ffw_hidden_dim=32, head_dim=8, vit_num_heads=2,
    ...     vit_hidden_dim=16, vit_num_layers=1, vit_intermediate_dim=32)
    >>> hidden = backbone({
    ...     "images": np.zeros((1, 28, 28, 3)),
    ...     "token_ids": np.array([[2, 7, 8, 1]]),
    ...     "padding_mask": np.array([[1, 1, 1, 1]]),
    ...     "response_mask": np.array([[0, 0, 1, 1]])})
    >>> tuple(hidden.shape)
    (1, 4, 16)
    """

    preset_kind = "backbone"

    def __init__(
        self,
        vocabulary_size,
        image_size,
        num_layers,
        num_query_heads,
        num_key_value_heads,
        hidden_dim,
        ffw_hidden_dim,
        head_dim,
        vit_patch_size=14,
        vit_num_heads=16,
        vit_hidden_dim=1152,
        vit_num_layers=27,
        vit_intermediate_dim=4304,
        num_images=1,
        query_pre_attn_scalar=None,
        use_post_norms=False,
        attention_logit_softcap=None,
        final_logit_softcap=None,
        sliding_window=None,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10000,
        dtype=None,
        lora=None,
        **kwargs,
    ):
        if query_pre_attn_scalar is None:
            query_pre_attn_scalar = head_dim
        # === Layers ===
        self.vision_encoder = VisionEncoder(
            image_size=image_size,
            patch_size=vit_patch_size,
            hidden_dim=vit_hidden_dim,
            intermediate_dim=vit_intermediate_dim,
            num_heads=vit_num_heads,
            num_layers=vit_num_layers,
            output_dim=hidden_dim,
            dtype=dtype,
            name="vision_encoder",
        )
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            logit_soft_cap=final_logit_softcap,
            embeddings_initializer=keras.initializers.RandomNormal(
                stddev=hidden_dim**-0.5
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.decoder_blocks = [
            DecoderBlock(
                hidden_dim=hidden_dim,
                intermediate_dim=ffw_hidden_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads,
                head_dim=head_dim,
                query_pre_attn_scalar=query_pre_attn_scalar,
                attention_logit_softcap=attention_logit_softcap,
                use_post_norms=use_post_norms,
                layer_norm_epsilon=layer_norm_epsilon,
                dtype=dtype,
                name=f"decoder_block_{i}",
            )
            for i in range(num_layers)
        ]
        self.final_norm = RMSNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="final_norm"
        )
        self.sliding_window = sliding_window
        self.num_images = num_images
        self.num_image_tokens = num_images * self.vision_encoder.num_patches

        # === Functional model ===
        image_shape = (image_size, image_size, 3)
        if num_images > 1:
            image_shape = (num_images,) + image_shape
        images = keras.Input(image_shape, name="images")
        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
        response_mask = keras.Input(
            (None,), dtype="int32", name="response_mask"
        )
        inputs = {
            "images": images,
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "response_mask": response_mask,
        }
        image_mask = None
        if num_images > 1:
            image_mask = keras.Input((num_images,), dtype="int32", name="image_mask")
            inputs["image_mask"] = image_mask
        valid, response, positions = self.sequence_layout(
            padding_mask, response_mask, image_mask
        )
        x = ops.concatenate(
            [self.encode_images(images), self.embed_tokens(token_ids)],
            axis=1,
        )
        x = self.decode(x, valid, response, positions)
        super().__init__(
            inputs=inputs,
            outputs=x[:, self.num_image_tokens :, :],
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.image_size = image_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_dim = hidden_dim
        self.ffw_hidden_dim = ffw_hidden_dim
        self.head_dim = head_dim
        self.vit_patch_size = vit_patch_size
        self.vit_num_heads = vit_num_heads
        self.vit_hidden_dim = vit_hidden_dim
        self.vit_num_layers = vit_num_layers
        self.vit_intermediate_dim = vit_intermediate_dim
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.use_post_norms = use_post_norms
        self.attention_logit_softcap = attention_logit_softcap
        self.final_logit_softcap = final_logit_softcap
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        if lora:
            self.enable_lora(**lora)

    def encode_images(self, images):
        """Image tokens `(batch, num_image_tokens, hidden_dim)`, in order.

        `images` is `(batch, size, size, 3)`, or `(batch, num_images, size,
        size, 3)` for a multi-image backbone: each image gives its block of
        tokens, first image first.
        """
        if self.num_images == 1:
            return self.vision_encoder(images)
        size = self.vision_encoder.image_size
        flat = ops.reshape(images, (-1, size, size, 3))
        tokens = self.vision_encoder(flat)
        return ops.reshape(
            tokens, (-1, self.num_image_tokens, ops.shape(tokens)[-1])
        )

    def sequence_layout(self, padding_mask, response_mask, image_mask=None):
        """Per-token `valid`, `response` and `positions` of image + text.

        Image tokens belong to the prefix and are valid unless `image_mask`
        (`(batch, num_images)`, multi-image backbones) marks their image
        missing; positions count the valid tokens before each token, so
        padding anywhere leaves the positions of real tokens unchanged.
        """
        padding_mask = ops.cast(padding_mask, "bool")
        if image_mask is None:
            image_valid = ops.repeat(
                ops.ones_like(padding_mask[:, :1]), self.num_image_tokens, 1
            )
        else:
            image_valid = ops.repeat(
                ops.cast(image_mask, "bool"),
                self.vision_encoder.num_patches,
                axis=1,
            )
        valid = ops.concatenate([image_valid, padding_mask], axis=1)
        response = ops.concatenate(
            [
                ops.zeros_like(image_valid),
                ops.cast(response_mask, "bool"),
            ],
            axis=1,
        )
        positions = ops.cumsum(ops.cast(valid, "int32"), axis=1) - 1
        return valid, response, positions

    def embed_tokens(self, token_ids):
        """Text embeddings, scaled by `sqrt(hidden_dim)` as in Gemma."""
        x = self.token_embedding(token_ids)
        return x * ops.cast(self.token_embedding.output_dim**0.5, x.dtype)

    def decode(
        self,
        x,
        valid,
        response,
        positions,
        cache=None,
        cache_update_index=0,
        output_index=None,
    ):
        """Run the decoder blocks and the final norm over embeddings `x`.

        `valid`, `response` and `positions` describe every key: the whole
        sequence (then `x` holds every token), or every cache slot when
        `cache` is given (then the queries `x` sit at `cache_update_index`
        among them).

        Args:
            x: `(batch, queries, hidden_dim)` embeddings.
            valid, response, positions: `(batch, keys)`, see
                `prefix_lm_attention_mask`.
            cache: `None`, or one `(batch, 2, keys, kv_heads, head_dim)`
                tensor of keys and values per layer (a tuple): each layer
                updates its own, so a step never copies the whole cache.
                The sliding-window layers' may instead be rings of
                `sliding_window` slots (`window_rings`), for decode steps.
            cache_update_index: index of the first query among the keys.
            output_index: with a cache, `None` or the index of the one
                query whose hidden state is returned, `(batch, 1,
                hidden_dim)`; the last block then computes its feed-forward
                for that row alone (every cache is still written in full).
                A prefill that needs one row saves most of a block.

        Returns:
            The hidden states, or `(hidden_states, cache)` with a cache.
        """
        if cache is None:
            query_length, query_positions = None, positions
        else:
            query_length = ops.shape(x)[1]
            query_positions = ops.slice(
                positions,
                [0, cache_update_index],
                [ops.shape(x)[0], query_length],
            )
        # Per window: the mask and where each layer writes its cache.
        rings = holds_window_rings(
            cache, self.sliding_window, ops.shape(valid)[1]
        )
        windows = {None} if rings else {None, self.sliding_window}
        masks = {
            window: (
                prefix_lm_attention_mask(
                    valid,
                    response,
                    positions,
                    query_start=cache_update_index,
                    query_length=query_length,
                    sliding_window=window,
                ),
                cache_update_index,
            )
            for window in windows
        }
        if rings:
            masks[self.sliding_window] = ring_mask_and_slots(
                query_positions, self.sliding_window
            )
        new_caches = []
        for i, block in enumerate(self.decoder_blocks):
            mask, index = masks[self.sliding_window if i % 2 == 0 else None]
            last = i == len(self.decoder_blocks) - 1
            if cache is None:
                x = block(x, mask, query_positions)
            else:
                x, layer_cache = call_sublayer(  # see sublayer_call.py
                    self,
                    block,
                    x,
                    mask,
                    query_positions,
                    cache=cache[i],
                    cache_update_index=index,
                    output_index=output_index if last else None,
                )
                new_caches.append(layer_cache)
        x = self.final_norm(x)
        if cache is None:
            return x
        return x, tuple(new_caches)

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` sharding this backbone's weights.

        See `keras_paligemma.models.layout_map.backbone_layout_map`.
        """
        from keras_paligemma.models.layout_map import backbone_layout_map

        return backbone_layout_map(
            device_mesh, model_parallel_dim_name, data_parallel_dim_name
        )

    def save_to_preset(self, preset_dir, max_shard_size=10, overwrite=False):
        """Save the backbone config and weights as a loadable preset.

        Args:
            preset_dir: directory to write; it must be missing or empty
                unless `overwrite=True`.
            max_shard_size: weights shard size in GB.
            overwrite: replace the files of an existing preset.
        """
        # A task saving itself has checked the directory already.
        inside_task_save = getattr(self, "_saving_inside_task", False)
        check_preset_dir(preset_dir, overwrite or inside_task_save)
        refuse_int4(self)
        with self.lora_kept_apart(preset_dir):
            super().save_to_preset(preset_dir, max_shard_size=max_shard_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "image_size": self.image_size,
                "num_layers": self.num_layers,
                "num_query_heads": self.num_query_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "hidden_dim": self.hidden_dim,
                "ffw_hidden_dim": self.ffw_hidden_dim,
                "head_dim": self.head_dim,
                "vit_patch_size": self.vit_patch_size,
                "vit_num_heads": self.vit_num_heads,
                "vit_hidden_dim": self.vit_hidden_dim,
                "vit_num_layers": self.vit_num_layers,
                "vit_intermediate_dim": self.vit_intermediate_dim,
                "num_images": self.num_images,
                "query_pre_attn_scalar": self.query_pre_attn_scalar,
                "use_post_norms": self.use_post_norms,
                "attention_logit_softcap": self.attention_logit_softcap,
                "final_logit_softcap": self.final_logit_softcap,
                "sliding_window": self.sliding_window,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "lora": self.lora_config,
            }
        )
        return config
