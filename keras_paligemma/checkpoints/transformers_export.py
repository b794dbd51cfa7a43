"""Write a `PaliGemmaBackbone` as a transformers PaliGemma checkpoint.

The inverse of `checkpoints/transformers.py`: a fine-tuned model can be
loaded with `PaliGemmaForConditionalGeneration.from_pretrained(directory)`.
Tensors use the long-standing names (`language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.linear.*`) that every
transformers version with PaliGemma reads. The image token id is the
vocabulary size (outside the vocabulary), as in the official checkpoints.

Example:

    from keras_paligemma.checkpoints.transformers_export import (
        export_transformers)
    export_transformers(causal_lm.backbone, "my-paligemma-hf")
"""

import json
import os

import numpy as np

from keras_paligemma.layers.kernel_layout import to_input_first
from keras_paligemma.models.preset_dir import check_preset_dir


def transformers_config(backbone):
    """The `config.json` dict transformers needs for this backbone."""
    b = backbone
    text = {
        "vocab_size": b.vocabulary_size,
        "hidden_size": b.hidden_dim,
        "intermediate_size": b.ffw_hidden_dim,
        "num_hidden_layers": b.num_layers,
        "num_attention_heads": b.num_query_heads,
        "num_key_value_heads": b.num_key_value_heads,
        "head_dim": b.head_dim,
        "rms_norm_eps": b.layer_norm_epsilon,
        "rope_theta": b.rope_max_wavelength,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "num_image_tokens": b.vision_encoder.num_patches,
    }
    if b.use_post_norms:
        layer_types = [
            "sliding_attention"
            if b.sliding_window is not None and i % 2 == 0
            else "full_attention"
            for i in range(b.num_layers)
        ]
        text.update(
            model_type="gemma2",
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=b.query_pre_attn_scalar,
            attn_logit_softcapping=b.attention_logit_softcap,
            final_logit_softcapping=b.final_logit_softcap,
            # Unused when every layer is full attention.
            sliding_window=b.sliding_window or 4096,
            layer_types=layer_types,
        )
    else:
        if b.query_pre_attn_scalar != b.head_dim:
            raise ValueError(
                "transformers' Gemma scales queries by head_dim; this "
                f"backbone uses query_pre_attn_scalar={b.query_pre_attn_scalar}."
            )
        text.update(model_type="gemma", hidden_act="gelu_pytorch_tanh")
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": b.vit_hidden_dim,
        "intermediate_size": b.vit_intermediate_dim,
        "num_hidden_layers": b.vit_num_layers,
        "num_attention_heads": b.vit_num_heads,
        "image_size": b.image_size,
        "patch_size": b.vit_patch_size,
        "layer_norm_eps": 1e-6,
        "projection_dim": b.hidden_dim,
        "vision_use_head": False,
    }
    return {
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "image_token_index": b.vocabulary_size,
        "vocab_size": b.vocabulary_size,
        "projection_dim": b.hidden_dim,
        "hidden_size": b.hidden_dim,
        "text_config": text,
        "vision_config": vision,
    }


def transformers_tensors(backbone):
    """Yield `(transformers name, numpy array)` for every backbone weight."""
    import keras

    weights = {  # Kernels input-first, as Keras lays them out.
        v.path: to_input_first(v.path, keras.ops.convert_to_numpy(v).astype("float32"))
        for v in backbone.weights
    }
    vision = "vision_tower.vision_model."
    yield vision + "embeddings.patch_embedding.weight", weights[
        "vision_encoder/patch_embedding/kernel"
    ].transpose(3, 2, 0, 1)
    yield vision + "embeddings.patch_embedding.bias", weights[
        "vision_encoder/patch_embedding/bias"
    ]
    yield vision + "embeddings.position_embedding.weight", weights[
        "vision_encoder/position_embedding"
    ]
    for i in range(backbone.vit_num_layers):
        ours = f"vision_encoder/block_{i}/"
        theirs = f"{vision}encoder.layers.{i}."
        for name, norm in (("layer_norm1", "attention_norm"), ("layer_norm2", "mlp_norm")):
            yield theirs + name + ".weight", weights[ours + norm + "/gamma"]
            yield theirs + name + ".bias", weights[ours + norm + "/beta"]
        for name, layer in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            kernel = weights[ours + layer + "/kernel"]
            yield theirs + f"self_attn.{name}.weight", kernel.reshape(kernel.shape[0], -1).T
            yield theirs + f"self_attn.{name}.bias", weights[ours + layer + "/bias"].reshape(-1)
        kernel = weights[ours + "attention_output/kernel"]
        yield theirs + "self_attn.out_proj.weight", kernel.reshape(-1, kernel.shape[-1]).T
        yield theirs + "self_attn.out_proj.bias", weights[ours + "attention_output/bias"]
        for name, layer in (("fc1", "mlp_in"), ("fc2", "mlp_out")):
            yield theirs + f"mlp.{name}.weight", weights[ours + layer + "/kernel"].T
            yield theirs + f"mlp.{name}.bias", weights[ours + layer + "/bias"]
    yield vision + "post_layernorm.weight", weights["vision_encoder/encoder_norm/gamma"]
    yield vision + "post_layernorm.bias", weights["vision_encoder/encoder_norm/beta"]
    yield "multi_modal_projector.linear.weight", weights["vision_encoder/projector/kernel"].T
    yield "multi_modal_projector.linear.bias", weights["vision_encoder/projector/bias"]

    text = "language_model.model."
    yield text + "embed_tokens.weight", weights["token_embedding/embeddings"]
    yield text + "norm.weight", weights["final_norm/scale"]
    if backbone.use_post_norms:
        norms = {
            "pre_attention_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        }
    else:
        norms = {
            "pre_attention_norm": "input_layernorm",
            "pre_ffw_norm": "post_attention_layernorm",
        }
    for i in range(backbone.num_layers):
        ours = f"decoder_block_{i}/"
        theirs = f"{text}layers.{i}."
        for norm, name in norms.items():
            yield theirs + name + ".weight", weights[ours + norm + "/scale"]
        for name, layer in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            kernel = weights[ours + f"attention/{layer}/kernel"]
            yield theirs + f"self_attn.{name}.weight", kernel.reshape(kernel.shape[0], -1).T
        kernel = weights[ours + "attention/attention_output/kernel"]
        yield theirs + "self_attn.o_proj.weight", kernel.reshape(-1, kernel.shape[-1]).T
        for name, layer in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            yield theirs + f"mlp.{name}.weight", weights[ours + layer + "/kernel"].T


def export_transformers(backbone, directory, overwrite=False):
    """Write `config.json` and `model.safetensors` for transformers.

    Args:
        backbone: a `PaliGemmaBackbone` (single-image).
        directory: where to write; it must be missing or empty unless
            `overwrite=True`.
        overwrite: replace an existing checkpoint.
    """
    from safetensors.numpy import save_file

    if backbone.num_images != 1:
        raise ValueError(
            "transformers takes the number of images from its inputs: "
            "export a single-image backbone (num_images=1)."
        )
    check_preset_dir(directory, overwrite)
    config = transformers_config(backbone)
    tensors = {
        name: np.ascontiguousarray(value)
        for name, value in transformers_tensors(backbone)
    }
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
