"""Load keras-hub PaliGemma presets (Kaggle `keras/paligemma*`) into our classes.

A keras-hub preset directory holds `config.json`
(`registered_name: keras_hub>PaliGemmaBackbone`), `model.weights.h5`, the
SentencePiece vocabulary in `assets/tokenizer/vocabulary.spm` and optional
`preprocessor.json`. We read the weights file with h5py one dataset at a
time (no keras-hub model is built) and map each dataset, by its path in
Keras' saving layout, onto our variable.

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


def keras_hub_config(config):
    """keras-hub `PaliGemmaBackbone` keyword arguments for one of our configs.

    The inverse of `backbone_config` (`config` as from our backbone's
    `get_config()`; omitted ViT settings take the So400m values).
    """
    head_dim = config["head_dim"]
    scalar = config.get("query_pre_attn_scalar") or head_dim
    per_head_width = config["hidden_dim"] // config["num_query_heads"]
    if scalar not in (head_dim, per_head_width):
        raise ValueError(
            "keras-hub scales queries by `head_dim` or by `hidden_dim / "
            f"num_query_heads` ({head_dim} or {per_head_width}); "
            f"`query_pre_attn_scalar={scalar}` cannot be expressed."
        )
    post_norms = bool(config.get("use_post_norms"))
    window = config.get("sliding_window")
    return dict(
        vocabulary_size=config["vocabulary_size"],
        image_size=config["image_size"],
        num_layers=config["num_layers"],
        num_query_heads=config["num_query_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        hidden_dim=config["hidden_dim"],
        intermediate_dim=2 * config["ffw_hidden_dim"],
        head_dim=head_dim,
        vit_patch_size=config.get("vit_patch_size", 14),
        vit_num_heads=config.get("vit_num_heads", 16),
        vit_hidden_dim=config.get("vit_hidden_dim", 1152),
        vit_num_layers=config.get("vit_num_layers", 27),
        vit_intermediate_dim=config.get("vit_intermediate_dim", 4304),
        query_head_dim_normalize=scalar == head_dim,
        use_post_ffw_norm=post_norms,
        use_post_attention_norm=post_norms,
        attention_logit_soft_cap=config.get("attention_logit_softcap"),
        final_logit_soft_cap=config.get("final_logit_softcap"),
        use_sliding_window_attention=window is not None,
        sliding_window_size=window or 4096,
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
    )


def _block_index(name):
    """`pali_gemma_decoder_block` -> 0, `pali_gemma_decoder_block_3` -> 3."""
    suffix = name.rsplit("_", 1)[1]
    return int(suffix) if suffix.isdigit() else 0


_VIT_LAYERS = {
    "layer_norm_1": ("attention_norm", ("gamma", "beta")),
    "layer_norm_2": ("mlp_norm", ("gamma", "beta")),
    "mlp_dense_1": ("mlp_in", ("kernel", "bias")),
    "mlp_dense_2": ("mlp_out", ("kernel", "bias")),
}
_DECODER_LAYERS = {
    "gating_ffw": "gate/kernel",
    "gating_ffw_2": "up/kernel",
    "ffw_linear": "down/kernel",
    "pre_attention_norm": "pre_attention_norm/scale",
    "pre_ffw_norm": "pre_ffw_norm/scale",
    "post_attention_norm": "post_attention_norm/scale",
    "post_ffw_norm": "post_ffw_norm/scale",
}


def our_variable(h5_path, value, config):
    """`(our variable path, value)` for one keras-hub weights-file dataset.

    `h5_path` is the dataset's name in keras-hub's `model.weights.h5`
    (Keras' saving layout, e.g.
    `layers/pali_gemma_decoder_block_3/attention/query_dense/vars/0`).
    Raises `ValueError` for a dataset PaliGemma does not have.
    """
    parts = h5_path.split("/")
    if parts[0] != "layers" or parts[-2] != "vars" or len(parts) < 4:
        raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")
    layer, index = parts[1:-2], int(parts[-1])
    if layer == ["reversible_embedding"]:
        return "token_embedding/embeddings", value
    if layer == ["rms_normalization"]:
        return "final_norm/scale", value
    if layer[0].startswith("pali_gemma_decoder_block"):
        return _decoder_variable(layer, value, h5_path)
    if layer[:2] == ["pali_gemma_vit", "layers"]:
        return _vision_variable(layer[2:], index, value, config, h5_path)
    raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")


def _decoder_variable(layer, value, h5_path):
    block = f"decoder_block_{_block_index(layer[0])}"
    if layer[1:2] == ["attention"] and len(layer) == 3:
        name = layer[2].removesuffix("_dense")
        if name in ("query", "key", "value"):
            # keras-hub (heads, dim, head_dim) -> ours (dim, heads, head_dim).
            return f"{block}/attention/{name}/kernel", value.transpose(1, 0, 2)
        if name == "output":
            return f"{block}/attention/attention_output/kernel", value
    elif len(layer) == 2 and layer[1] in _DECODER_LAYERS:
        return f"{block}/{_DECODER_LAYERS[layer[1]]}", value
    raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")


def _vision_variable(layer, index, value, config, h5_path):
    root = "vision_encoder"
    if layer == ["dense"]:
        return f"{root}/projector/{('kernel', 'bias')[index]}", value
    if layer[0] != "pali_gemma_vit_encoder" or len(layer) < 2:
        raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")
    layer = layer[1:]
    if layer == ["encoder_layer_norm"]:
        return f"{root}/encoder_norm/{('gamma', 'beta')[index]}", value
    if layer == ["vision_embeddings", "patch_embedding"]:
        return f"{root}/patch_embedding/{('kernel', 'bias')[index]}", value
    if layer == ["vision_embeddings", "position_embedding"]:
        return f"{root}/position_embedding", value
    if layer[0] != "resblocks" or len(layer) < 3:
        raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")
    block = f"{root}/block_{_block_index(layer[1])}"
    kind = ("kernel", "bias")[index]
    if layer[2] == "attn" and len(layer) == 4:
        heads = config["vit_num_heads"]
        projection = layer[3].removesuffix("_proj")
        if projection == "out":
            if kind == "kernel":
                value = value.reshape(heads, -1, value.shape[-1])
            return f"{block}/attention_output/{kind}", value
        if kind == "kernel":
            value = value.reshape(value.shape[0], heads, -1)
        else:
            value = value.reshape(heads, -1)
        return f"{block}/{projection}/{kind}", value
    if layer[2] in _VIT_LAYERS and len(layer) == 3:
        name, kinds = _VIT_LAYERS[layer[2]]
        return f"{block}/{name}/{kinds[index]}", value
    raise ValueError(f"`{h5_path}` is not a keras-hub PaliGemma weight.")


def weight_files(preset_dir):
    """The `*.weights.h5` files of a keras-hub preset (one, or its shards)."""
    single = os.path.join(preset_dir, "model.weights.h5")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(preset_dir, "model.weights.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"No weights in `{preset_dir}`: expected `model.weights.h5` or "
            "the sharded `model.weights.json`."
        )
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError) as error:
        raise ValueError(f"`{index}` is truncated or corrupted ({error!r}).") from None
    names = set()
    for shards in weight_map.values():
        names.update([shards] if isinstance(shards, str) else shards)
    return [os.path.join(preset_dir, name) for name in sorted(names)]


def read_weights(preset_dir, progress=True):
    """Yield `(h5 dataset path, numpy array)` for every keras-hub weight.

    Datasets are read one at a time in their stored dtype (bfloat16 stays
    bfloat16); `progress` shows a Keras progress bar over them.
    """
    import h5py
    import keras

    files = weight_files(preset_dir)
    names = [_dataset_names(path) for path in files]
    bar = None
    if progress:
        bar = keras.utils.Progbar(sum(map(len, names)), unit_name="tensor")
    for path, datasets in zip(files, names):
        with h5py.File(path, "r") as f:
            for name in datasets:
                yield name, _read_dataset(f, path, name)
                if bar is not None:
                    bar.add(1)


def _dataset_names(path):
    import h5py

    names = []
    try:
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, item: names.append(name)
                if isinstance(item, h5py.Dataset) else None
            )
    except OSError as error:
        raise ValueError(
            f"`{path}` is truncated or corrupted: cannot read it ({error})."
        ) from None
    return names


def _read_dataset(f, path, name):
    import ml_dtypes

    try:
        dataset = f[name]
        value = dataset[()]
    except (OSError, KeyError) as error:
        raise ValueError(
            f"`{path}` is truncated or corrupted: reading `{name}` failed "
            f"({error})."
        ) from None
    if dataset.attrs.get("dtype") == "bfloat16":
        value = value.view(ml_dtypes.bfloat16)
    return value


def load_weights(backbone, preset_dir, config):
    """Fill our backbone from a keras-hub preset's weights, one at a time."""

    def assignments():
        for name, value in read_weights(preset_dir):
            path, value = our_variable(name, value, config)
            yield path, value, f"keras-hub {name}"

    assign_weights(backbone, assignments())


def load_backbone(preset_dir, dtype=None):
    """Our `PaliGemmaBackbone` from a keras-hub PaliGemma preset directory.

    Reads `model.weights.h5` (or its shards) one dataset at a time with
    h5py: no keras-hub model is built.
    """
    from keras_paligemma.models.backbone import PaliGemmaBackbone

    if not is_keras_hub_preset(preset_dir):
        raise ValueError(
            f"`{preset_dir}` is not a keras-hub PaliGemma preset (its "
            f"config.json must have registered_name '{REGISTERED_NAME}')."
        )
    with open(os.path.join(preset_dir, "config.json")) as f:
        config = backbone_config(json.load(f)["config"])
    backbone = PaliGemmaBackbone(**config, dtype=dtype)
    load_weights(backbone, preset_dir, config)
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
