"""Load an HF transformers PaliGemma checkpoint into a `PaliGemmaBackbone`.

Reads `config.json` and the `*.safetensors` files of a checkpoint directory
(as written by `PaliGemmaForConditionalGeneration.save_pretrained`, or
downloaded from a `google/paligemma*` repository) one tensor at a time.
Both the current (`model.language_model.*`) and the legacy
(`language_model.model.*`) parameter names are understood.

Example (with a directory written by transformers' `save_pretrained`):

    from keras_paligemma.checkpoints.transformers import load_backbone
    backbone = load_backbone("path/to/paligemma2-3b-pt-224")
"""

import json
import os
import struct

import numpy as np

from keras_paligemma.checkpoints.common import assign_weights
from keras_paligemma.checkpoints.common import causal_lm_with

_PREFIXES = (
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear.", "projector."),
    ("multi_modal_projector.linear.", "projector."),
)


def backbone_config(hf_config):
    """`PaliGemmaBackbone` keyword arguments for a transformers config dict."""
    text = hf_config["text_config"]
    vision = hf_config["vision_config"]
    if vision.get("layer_norm_eps", 1e-6) != 1e-6:
        raise ValueError(
            "Only SigLIP encoders with `layer_norm_eps=1e-6` are supported; "
            f"the checkpoint has {vision['layer_norm_eps']}."
        )
    gemma2 = text.get("model_type") == "gemma2"
    rope = text.get("rope_parameters") or {}
    config = dict(
        vocabulary_size=hf_config.get("vocab_size") or text["vocab_size"],
        image_size=vision["image_size"],
        num_layers=text["num_hidden_layers"],
        num_query_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        hidden_dim=text["hidden_size"],
        ffw_hidden_dim=text["intermediate_size"],
        head_dim=text.get("head_dim", 256),
        vit_patch_size=vision["patch_size"],
        vit_num_heads=vision["num_attention_heads"],
        vit_hidden_dim=vision["hidden_size"],
        vit_num_layers=vision["num_hidden_layers"],
        vit_intermediate_dim=vision["intermediate_size"],
        layer_norm_epsilon=text.get("rms_norm_eps", 1e-6),
        rope_max_wavelength=rope.get("rope_theta", text.get("rope_theta", 1e4)),
    )
    if gemma2:
        config.update(
            query_pre_attn_scalar=text["query_pre_attn_scalar"],
            use_post_norms=True,
            attention_logit_softcap=text.get("attn_logit_softcapping"),
            final_logit_softcap=text.get("final_logit_softcapping"),
            sliding_window=_sliding_window(text),
        )
    return config


def _sliding_window(text):
    window = text.get("sliding_window")
    layer_types = text.get("layer_types")
    if window is None or layer_types is None:
        return window
    if all(kind == "full_attention" for kind in layer_types):
        return None
    expected = [
        "sliding_attention" if i % 2 == 0 else "full_attention"
        for i in range(len(layer_types))
    ]
    if list(layer_types) != expected:
        raise ValueError(
            "Only Gemma 2 decoders with sliding attention on even layers are "
            f"supported; the checkpoint has `layer_types={layer_types}`."
        )
    return window


_SAFETENSORS_DTYPES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
}


def _safetensors_header(path):
    """`(data start offset, {name: entry})` of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as error:
        raise ValueError(
            f"`{path}` is truncated or corrupted: cannot read its header "
            f"({error})."
        ) from error
    header.pop("__metadata__", None)
    return 8 + length, header


def read_tensors(checkpoint_dir, progress=True):
    """Yield `(name, numpy array)` for every checkpoint tensor.

    Arrays keep the file's dtype (bfloat16 stays bfloat16: half the memory
    of float32; `assign_weights` converts them block by block). Each tensor
    is read with plain reads (no memory map) and nothing keeps it once the
    consumer drops it, so only the model and one tensor are in memory;
    `progress` shows a Keras progress bar over the tensors.
    """
    import keras

    files = sorted(
        f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors")
    )
    if not files:
        raise FileNotFoundError(
            f"No `*.safetensors` file in `{checkpoint_dir}`: expected a "
            "transformers PaliGemma checkpoint directory."
        )
    headers = [_safetensors_header(os.path.join(checkpoint_dir, f)) for f in files]
    bar = None
    if progress:
        bar = keras.utils.Progbar(sum(len(h) for _, h in headers), unit_name="tensor")
    for filename, (start, header) in zip(files, headers):
        path = os.path.join(checkpoint_dir, filename)
        with open(path, "rb") as f:
            for name, entry in header.items():
                yield name, _read_tensor(f, path, start, name, entry)
                if bar is not None:
                    bar.add(1)


def _read_tensor(f, path, start, name, entry):
    """One tensor of an open safetensors file, in its stored dtype."""
    import ml_dtypes

    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(
            f"`{path}`: tensor `{name}` has unsupported dtype {entry['dtype']}."
        )
    if dtype == "bfloat16":
        dtype = ml_dtypes.bfloat16
    begin, finish = entry["data_offsets"]
    f.seek(start + begin)
    data = f.read(finish - begin)
    if len(data) != finish - begin:
        raise ValueError(
            f"`{path}` is truncated or corrupted: tensor `{name}` needs "
            f"{finish - begin} bytes, the file has {len(data)}."
        )
    # A read-only view of the bytes: no second copy.
    return np.frombuffer(data, dtype=dtype).reshape(entry["shape"])


def _canonical_name(name):
    for prefix, replacement in _PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix) :]
    return None


def _variable_assignments(name, value, config):
    """`(variable path, value)` pairs for one canonical checkpoint tensor."""
    parts = name.split(".")
    if parts[0] == "projector":
        kind = "kernel" if parts[1] == "weight" else "bias"
        return [(f"vision_encoder/projector/{kind}", _linear(value))]
    if parts[0] == "vision":
        return _vision_assignments(parts[1:], value, config)
    return _text_assignments(parts[1:], value, config)


def _linear(value):
    """A torch `Linear` weight `(out, in)` as a Keras kernel `(in, out)`."""
    return value.T if value.ndim == 2 else value


def _vision_assignments(parts, value, config):
    heads = config["vit_num_heads"]
    head_dim = config["vit_hidden_dim"] // heads
    root = "vision_encoder"
    if parts[0] == "embeddings":
        if parts[1] == "patch_embedding":
            if parts[2] == "weight":
                value = value.transpose(2, 3, 1, 0)
                return [(f"{root}/patch_embedding/kernel", value)]
            return [(f"{root}/patch_embedding/bias", value)]
        return [(f"{root}/position_embedding", value)]
    if parts[0] == "post_layernorm":
        kind = "gamma" if parts[1] == "weight" else "beta"
        return [(f"{root}/encoder_norm/{kind}", value)]
    if parts[0] == "head":
        return []  # SigLIP pooling head: unused by PaliGemma.
    block = f"{root}/block_{parts[2]}"
    module, param = parts[3], parts[-1]
    if module in ("layer_norm1", "layer_norm2"):
        norm = "attention_norm" if module == "layer_norm1" else "mlp_norm"
        kind = "gamma" if param == "weight" else "beta"
        return [(f"{block}/{norm}/{kind}", value)]
    if module == "mlp":
        layer = "mlp_in" if parts[4] == "fc1" else "mlp_out"
        kind = "kernel" if param == "weight" else "bias"
        return [(f"{block}/{layer}/{kind}", _linear(value))]
    projection = parts[4]
    if projection == "out_proj":
        if param == "weight":
            value = value.T.reshape(heads, head_dim, -1)
        return [(f"{block}/attention_output/{_param_name(param)}", value)]
    layer = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}[projection]
    if param == "weight":
        value = value.T.reshape(-1, heads, head_dim)
    else:
        value = value.reshape(heads, head_dim)
    return [(f"{block}/{layer}/{_param_name(param)}", value)]


def _param_name(param):
    return "kernel" if param == "weight" else "bias"


def _text_assignments(parts, value, config):
    if parts[0] == "embed_tokens":
        value = value[: config["vocabulary_size"]]
        return [("token_embedding/embeddings", value)]
    if parts[0] == "norm":
        return [("final_norm/scale", value)]
    block = f"decoder_block_{parts[1]}"
    module = parts[2]
    head_dim = config["head_dim"]
    if module == "self_attn":
        projection = parts[3]
        if projection == "o_proj":
            value = value.T.reshape(-1, head_dim, config["hidden_dim"])
            return [(f"{block}/attention/attention_output/kernel", value)]
        layer = {"q_proj": "query", "k_proj": "key", "v_proj": "value"}
        value = value.T.reshape(config["hidden_dim"], -1, head_dim)
        return [(f"{block}/attention/{layer[projection]}/kernel", value)]
    if module == "mlp":
        layer = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        return [(f"{block}/{layer[parts[3]]}/kernel", _linear(value))]
    if config.get("use_post_norms"):
        norms = {
            "input_layernorm": "pre_attention_norm",
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "pre_ffw_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        }
    else:
        norms = {
            "input_layernorm": "pre_attention_norm",
            "post_attention_layernorm": "pre_ffw_norm",
        }
    return [(f"{block}/{norms[module]}/scale", value)]


def load_weights(backbone, tensors, config):
    """Assign `(name, array)` checkpoint tensors to the backbone's variables.

    Raises `ValueError` naming the variable and both shapes on a mismatch,
    and listing variables that received no tensor.
    """

    def assignments():
        for name, value in tensors:
            canonical = _canonical_name(name)
            if canonical is None:
                continue  # e.g. the tied `lm_head.weight`.
            for path, array in _variable_assignments(canonical, value, config):
                yield path, array, name

    assign_weights(backbone, assignments())


def is_transformers_checkpoint(checkpoint_dir):
    """Whether the directory holds a transformers PaliGemma `config.json`."""
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("model_type") == "paligemma"


def load_causal_lm(checkpoint_dir, dtype=None, sequence_length=1024):
    """Our `PaliGemmaCausalLM` from a transformers checkpoint directory.

    Needs the SentencePiece model `tokenizer.model` beside the weights (the
    `google/paligemma*` repositories ship it).
    """
    vocabulary = os.path.join(checkpoint_dir, "tokenizer.model")
    if not os.path.isfile(vocabulary):
        raise FileNotFoundError(
            f"No `tokenizer.model` in `{checkpoint_dir}`: the causal LM needs "
            "the SentencePiece vocabulary. Load the weights alone with "
            "`PaliGemmaBackbone.from_preset`."
        )
    backbone = load_backbone(checkpoint_dir, dtype=dtype)
    with open(vocabulary, "rb") as f:
        return causal_lm_with(backbone, f.read(), sequence_length)


def load_backbone(checkpoint_dir, dtype=None, num_images=1):
    """Build a `PaliGemmaBackbone` from a transformers checkpoint directory.

    Args:
        checkpoint_dir: directory with `config.json` and `*.safetensors`.
        dtype: dtype policy of the backbone (defaults to Keras' default).
        num_images: images per example (2 for the NLVR2 checkpoints;
            transformers takes it from the inputs, we fix it in the config).
    """
    from keras_paligemma.models.backbone import PaliGemmaBackbone

    config_path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"No `config.json` in `{checkpoint_dir}`: expected a transformers "
            "PaliGemma checkpoint directory."
        )
    with open(config_path) as f:
        hf_config = json.load(f)
    if hf_config.get("model_type") != "paligemma":
        raise ValueError(
            f"`{config_path}` has model_type "
            f"{hf_config.get('model_type')!r}, expected 'paligemma'."
        )
    config = backbone_config(hf_config)
    backbone = PaliGemmaBackbone(**config, num_images=num_images, dtype=dtype)
    load_weights(backbone, read_tensors(checkpoint_dir), config)
    return backbone


__all__ = [
    "backbone_config",
    "is_transformers_checkpoint",
    "load_backbone",
    "load_causal_lm",
    "load_weights",
    "read_tensors",
]
