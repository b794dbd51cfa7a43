"""Load a big_vision PaliGemma checkpoint (`.npz`) into a `PaliGemmaBackbone`.

big_vision stores parameters under `/`-joined names (`img/...`, `llm/...`,
optionally behind `params/`), with the layers of each tower stacked on a
leading axis; bfloat16 arrays come back from `np.load` as 2-byte voids and
are viewed as bfloat16. The architecture is read off the shapes; the few
settings shapes cannot tell (the query scaling of Gemma 2) come from the
matching official decoder, or from the arguments.

Example:

    from keras_paligemma.checkpoints.big_vision import load_backbone
    backbone = load_backbone("paligemma2-3b-pt-224.b16.npz")
"""

import zipfile

import numpy as np

from keras_paligemma.checkpoints.common import assign_weights

VISION = "img/Transformer/encoderblock/"
ATTENTION = VISION + "MultiHeadDotProductAttention_0/"


def read_npz(path):
    """`{name: float32 array}` of a big_vision `.npz`, `params/` stripped."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"`{path}` is not a readable big_vision .npz file (truncated or "
            f"corrupted?): {error}"
        ) from error
    with data:
        arrays = {}
        for name in data.files:
            try:
                value = data[name]
            except Exception as error:  # zipfile/zlib errors on truncation.
                raise ValueError(
                    f"`{path}` is truncated or corrupted (reading `{name}` "
                    f"failed: {error})."
                ) from error
            arrays[name.removeprefix("params/")] = as_float32(value)
    return arrays


def as_float32(value):
    """float32 copy of an array; 2-byte voids are read as bfloat16."""
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        import ml_dtypes

        value = value.view(ml_dtypes.bfloat16)
    return np.asarray(value, dtype="float32")


def backbone_config(arrays, query_pre_attn_scalar=None, sliding_window=None):
    """`PaliGemmaBackbone` keyword arguments read off the parameter shapes."""
    from keras_paligemma.presets import _DECODERS

    patch = arrays["img/embedding/kernel"].shape[0]
    positions = arrays["img/pos_embedding"].shape[-2]
    vit_layers, vit_hidden, vit_heads, _ = arrays[ATTENTION + "query/kernel"].shape
    num_layers, num_heads, hidden, head_dim = arrays["llm/layers/attn/q_einsum/w"].shape
    gemma2 = "llm/layers/post_attention_norm/scale" in arrays
    config = dict(
        vocabulary_size=arrays["llm/embedder/input_embedding"].shape[0],
        image_size=int(round(positions**0.5)) * patch,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=arrays["llm/layers/attn/kv_einsum/w"].shape[2],
        hidden_dim=hidden,
        ffw_hidden_dim=arrays["llm/layers/mlp/linear"].shape[1],
        head_dim=head_dim,
        vit_patch_size=patch,
        vit_num_heads=vit_heads,
        vit_hidden_dim=vit_hidden,
        vit_num_layers=vit_layers,
        vit_intermediate_dim=arrays[VISION + "MlpBlock_0/Dense_0/kernel"].shape[-1],
    )
    if gemma2:
        if query_pre_attn_scalar is None:
            official = [
                d for d in _DECODERS.values()
                if d["hidden_dim"] == hidden and d["num_layers"] == num_layers
            ]
            query_pre_attn_scalar = (
                official[0].get("query_pre_attn_scalar", head_dim)
                if official else head_dim
            )
        config.update(
            query_pre_attn_scalar=query_pre_attn_scalar,
            use_post_norms=True,
            attention_logit_softcap=50.0,
            final_logit_softcap=30.0,
            sliding_window=sliding_window,
        )
    return config


def _assignments(arrays, config):
    """`(our path, array, big_vision name)` for every backbone variable."""
    def get(name):
        return arrays[name], name

    value, name = get("img/embedding/kernel")
    yield "vision_encoder/patch_embedding/kernel", value, name
    value, name = get("img/embedding/bias")
    yield "vision_encoder/patch_embedding/bias", value, name
    value, name = get("img/pos_embedding")
    yield "vision_encoder/position_embedding", value.reshape(value.shape[-2:]), name
    for kind, ours in (("scale", "gamma"), ("bias", "beta")):
        value, name = get(f"img/Transformer/encoder_norm/{kind}")
        yield f"vision_encoder/encoder_norm/{ours}", value, name
    for kind in ("kernel", "bias"):
        value, name = get(f"img/head/{kind}")
        yield f"vision_encoder/projector/{kind}", value, name
    for i in range(config["vit_num_layers"]):
        block = f"vision_encoder/block_{i}/"
        for norm, ours in (("LayerNorm_0", "attention_norm"), ("LayerNorm_1", "mlp_norm")):
            for kind, variable in (("scale", "gamma"), ("bias", "beta")):
                value, name = get(f"{VISION}{norm}/{kind}")
                yield f"{block}{ours}/{variable}", value[i], name
        for layer in ("query", "key", "value"):
            for kind in ("kernel", "bias"):
                value, name = get(f"{ATTENTION}{layer}/{kind}")
                yield f"{block}{layer}/{kind}", value[i], name
        for kind in ("kernel", "bias"):
            value, name = get(f"{ATTENTION}out/{kind}")
            yield f"{block}attention_output/{kind}", value[i], name
            for dense, ours in (("Dense_0", "mlp_in"), ("Dense_1", "mlp_out")):
                value, name = get(f"{VISION}MlpBlock_0/{dense}/{kind}")
                yield f"{block}{ours}/{kind}", value[i], name

    value, name = get("llm/embedder/input_embedding")
    yield "token_embedding/embeddings", value, name
    value, name = get("llm/final_norm/scale")
    yield "final_norm/scale", value, name
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.get("use_post_norms"):
        norms += ["post_attention_norm", "post_ffw_norm"]
    for i in range(config["num_layers"]):
        block = f"decoder_block_{i}/"
        for norm in norms:
            value, name = get(f"llm/layers/{norm}/scale")
            yield f"{block}{norm}/scale", value[i], name
        value, name = get("llm/layers/attn/q_einsum/w")  # (L, N, D, H)
        yield f"{block}attention/query/kernel", value[i].transpose(1, 0, 2), name
        value, name = get("llm/layers/attn/kv_einsum/w")  # (L, 2, K, D, H)
        yield f"{block}attention/key/kernel", value[i, 0].transpose(1, 0, 2), name
        yield f"{block}attention/value/kernel", value[i, 1].transpose(1, 0, 2), name
        value, name = get("llm/layers/attn/attn_vec_einsum/w")  # (L, N, H, D)
        yield f"{block}attention/attention_output/kernel", value[i], name
        value, name = get("llm/layers/mlp/gating_einsum")  # (L, 2, D, F)
        yield f"{block}gate/kernel", value[i, 0], name
        yield f"{block}up/kernel", value[i, 1], name
        value, name = get("llm/layers/mlp/linear")  # (L, F, D)
        yield f"{block}down/kernel", value[i], name


def load_backbone(path, dtype=None, query_pre_attn_scalar=None, sliding_window=None):
    """Build a `PaliGemmaBackbone` from a big_vision `.npz` checkpoint.

    Args:
        path: the `.npz` file.
        dtype: dtype policy of the backbone.
        query_pre_attn_scalar: Gemma 2 query scaling; by default that of
            the official decoder with the same width and depth, else
            `head_dim`.
        sliding_window: `None` (full attention, as big_vision trains) or a
            window for layers 0, 2, 4, ...
    """
    from keras_paligemma.models.backbone import PaliGemmaBackbone

    arrays = read_npz(path)
    try:
        config = backbone_config(arrays, query_pre_attn_scalar, sliding_window)
        backbone = PaliGemmaBackbone(**config, dtype=dtype)
        assign_weights(backbone, _assignments(arrays, config))
    except KeyError as error:
        raise ValueError(
            f"`{path}` is missing the big_vision parameter {error}."
        ) from None
    return backbone
