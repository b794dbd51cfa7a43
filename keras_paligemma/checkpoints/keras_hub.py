"""Load keras-hub PaliGemma presets (Kaggle `keras/paligemma*`) into our classes.

A keras-hub preset directory holds `config.json`
(`registered_name: keras_hub>PaliGemmaBackbone`), `model.weights.h5`, the
SentencePiece vocabulary in `assets/tokenizer/vocabulary.spm` and optional
`preprocessor.json`. keras-hub itself rebuilds its backbone and reads the
weights; we map each of its variables (by path) onto ours.

Two keras-hub settings are kept as they are so logits match keras-hub:
`sliding_window_size` when `use_sliding_window_attention` is on, and the
query scaling chosen by `query_head_dim_normalize`. Images are resized
whole (our converter), not centre-cropped as keras-hub's default does.

Example (with a keras-hub preset directory on disk):

    from keras_paligemma.checkpoints.keras_hub import load_causal_lm
    causal_lm = load_causal_lm("pali_gemma2_mix_3b_224")
"""

import json
import os

from keras_paligemma.checkpoints.common import assign_weights
from keras_paligemma.checkpoints.common import causal_lm_with

REGISTERED_NAME = "keras_hub>PaliGemmaBackbone"


def is_keras_hub_preset(preset_dir):
    """Whether `preset_dir` holds a keras-hub PaliGemma backbone config."""
    path = os.path.join(preset_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("registered_name") == REGISTERED_NAME


def backbone_config(keras_hub_config):
    """`PaliGemmaBackbone` keyword arguments for a keras-hub config dict."""
    c = keras_hub_config
    if bool(c.get("use_post_ffw_norm")) != bool(c.get("use_post_attention_norm")):
        raise ValueError(
            "Only configs with both or neither of `use_post_ffw_norm` and "
            "`use_post_attention_norm` are supported (Gemma or Gemma 2)."
        )
    if c["intermediate_dim"] % 2:
        raise ValueError(
            f"keras-hub `intermediate_dim` ({c['intermediate_dim']}) must be "
            "even: it holds the gate and up widths together."
        )
    if c.get("query_head_dim_normalize", True):
        query_pre_attn_scalar = c["head_dim"]
    else:
        query_pre_attn_scalar = c["hidden_dim"] // c["num_query_heads"]
    sliding_window = None
    if c.get("use_sliding_window_attention"):
        sliding_window = c.get("sliding_window_size", 4096)
    return dict(
        vocabulary_size=c["vocabulary_size"],
        image_size=c["image_size"],
        num_layers=c["num_layers"],
        num_query_heads=c["num_query_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        hidden_dim=c["hidden_dim"],
        ffw_hidden_dim=c["intermediate_dim"] // 2,
        head_dim=c["head_dim"],
        vit_patch_size=c.get("vit_patch_size", 14),
        vit_num_heads=c.get("vit_num_heads", 16),
        vit_hidden_dim=c.get("vit_hidden_dim", 1152),
        vit_num_layers=c.get("vit_num_layers", 27),
        vit_intermediate_dim=c.get("vit_intermediate_dim") or 4304,
        query_pre_attn_scalar=query_pre_attn_scalar,
        use_post_norms=bool(c.get("use_post_ffw_norm")),
        attention_logit_softcap=c.get("attention_logit_soft_cap"),
        final_logit_softcap=c.get("final_logit_soft_cap"),
        sliding_window=sliding_window,
        layer_norm_epsilon=c.get("layer_norm_epsilon", 1e-6),
    )


def _our_variable(path, value, config):
    """`(our path, value)` for one keras-hub variable path and value."""
    parts = path.split("/")
    heads = config["vit_num_heads"]
    if parts[0] == "token_embedding":
        return "token_embedding/embeddings", value
    if parts[0] == "final_normalization":
        return "final_norm/scale", value
    if parts[0] == "image_classifier":
        return f"vision_encoder/projector/{parts[1]}", value
    if parts[0] == "image_encoder":
        root = "vision_encoder"
        if parts[1] == "encoder_layer_norm":
            return f"{root}/encoder_norm/{parts[2]}", value
        if parts[1] == "encoder_embeddings":
            if parts[2] == "embedding_conv":
                return f"{root}/patch_embedding/{parts[3]}", value
            return f"{root}/position_embedding", value
        block = f"{root}/block_{parts[1].rsplit('_', 1)[1]}"
        if parts[2] == "multi_head_attention":
            projection, kind = parts[3], parts[4]
            if projection == "out_proj":
                if kind == "kernel":
                    value = value.reshape(heads, -1, value.shape[-1])
                return f"{block}/attention_output/{kind}", value
            name = projection.replace("_proj", "")
            if kind == "kernel":
                value = value.reshape(value.shape[0], heads, -1)
            else:
                value = value.reshape(heads, -1)
            return f"{block}/{name}/{kind}", value
        names = {
            "layer_norm_1": "attention_norm",
            "layer_norm_2": "mlp_norm",
            "mlp_dense_1": "mlp_in",
            "mlp_dense_2": "mlp_out",
        }
        return f"{block}/{names[parts[2]]}/{parts[3]}", value
    block = parts[0]  # decoder_block_{i}: the same name as ours.
    if parts[1] == "attention":
        if parts[2] in ("query", "key", "value"):
            value = value.transpose(1, 0, 2)  # (heads, dim, head) -> (dim, ...)
        return "/".join([block] + parts[1:]), value
    names = {"ffw_gating": "gate", "ffw_gating_2": "up", "ffw_linear": "down"}
    if parts[1] in names:
        return f"{block}/{names[parts[1]]}/kernel", value
    return path, value  # pre/post attention and FFW norms.


def copy_weights(keras_hub_backbone, backbone, config):
    """Assign every keras-hub backbone variable to its twin in ours."""
    import keras

    def assignments():
        for variable in keras_hub_backbone.weights:
            value = keras.ops.convert_to_numpy(variable)
            path, value = _our_variable(variable.path, value, config)
            yield path, value, f"keras-hub {variable.path}"

    assign_weights(backbone, assignments())


def load_backbone(preset_dir, dtype=None):
    """Our `PaliGemmaBackbone` from a keras-hub PaliGemma preset directory."""
    import keras_hub

    from keras_paligemma.models.backbone import PaliGemmaBackbone

    if not is_keras_hub_preset(preset_dir):
        raise ValueError(
            f"`{preset_dir}` is not a keras-hub PaliGemma preset (its "
            f"config.json must have registered_name '{REGISTERED_NAME}')."
        )
    source = keras_hub.models.PaliGemmaBackbone.from_preset(preset_dir)
    with open(os.path.join(preset_dir, "config.json")) as f:
        config = backbone_config(json.load(f)["config"])
    backbone = PaliGemmaBackbone(**config, dtype=dtype)
    copy_weights(source, backbone, config)
    return backbone


def load_causal_lm(preset_dir, dtype=None):
    """Our `PaliGemmaCausalLM` (with preprocessor) from a keras-hub preset."""
    backbone = load_backbone(preset_dir, dtype=dtype)
    vocabulary = os.path.join(preset_dir, "assets", "tokenizer", "vocabulary.spm")
    if not os.path.isfile(vocabulary):
        raise FileNotFoundError(
            f"No tokenizer in `{preset_dir}`: expected {vocabulary}."
        )
    sequence_length = 1024
    preprocessor_json = os.path.join(preset_dir, "preprocessor.json")
    if os.path.isfile(preprocessor_json):
        with open(preprocessor_json) as f:
            sequence_length = json.load(f)["config"].get(
                "sequence_length", sequence_length
            )
    with open(vocabulary, "rb") as f:
        return causal_lm_with(backbone, f.read(), sequence_length)
