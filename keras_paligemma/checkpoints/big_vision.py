"""Load a big_vision PaliGemma checkpoint (`.npz`) into a `PaliGemmaBackbone`.

big_vision stores parameters under `/`-joined names (`img/...`, `llm/...`,
optionally behind `params/`), with the layers of each tower stacked on a
leading axis; bfloat16 arrays come back from `np.load` as 2-byte voids and
are viewed as bfloat16 (and stay bfloat16 until written into the model).
Arrays are read one at a time, so converting holds the model plus one
checkpoint array. The architecture is read off the shapes; the few
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


class NpzReader:
    """Reads a big_vision `.npz` one array at a time.

    `shapes` comes from the `.npy` headers alone; `load(name)` reads one
    array in its stored dtype (2-byte voids are viewed as bfloat16), so
    converting holds about one checkpoint array in memory besides the model.
    """

    def __init__(self, path):
        self.path = path
        self.shapes = {}
        self._members = {}
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    name = info.filename.removesuffix(".npy")
                    with archive.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            header = np.lib.format.read_array_header_1_0(f)
                        else:
                            header = np.lib.format.read_array_header_2_0(f)
                    key = name.removeprefix("params/")
                    self.shapes[key] = header[0]
                    self._members[key] = name
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"`{path}` is not a readable big_vision .npz file (truncated "
                f"or corrupted?): {error}"
            ) from error

    def load(self, key):
        if key not in self._members:
            raise KeyError(key)
        try:
            with np.load(self.path, allow_pickle=False) as data:
                return with_bfloat16(data[self._members[key]])
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(
                f"`{self.path}` is truncated or corrupted (reading `{key}` "
                f"failed: {error})."
            ) from error


def with_bfloat16(value):
    """The array itself, or a bfloat16 view of it if it holds 2-byte voids."""
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        import ml_dtypes

        return value.view(ml_dtypes.bfloat16)
    return value


def backbone_config(shapes, query_pre_attn_scalar=None, sliding_window=None):
    """`PaliGemmaBackbone` keyword arguments read off the parameter shapes.

    `shapes` maps big_vision names (without `params/`) to shapes.
    """
    from keras_paligemma.presets import _DECODERS

    patch = shapes["img/embedding/kernel"][0]
    positions = shapes["img/pos_embedding"][-2]
    vit_layers, vit_hidden, vit_heads, _ = shapes[ATTENTION + "query/kernel"]
    num_layers, num_heads, hidden, head_dim = shapes["llm/layers/attn/q_einsum/w"]
    gemma2 = "llm/layers/post_attention_norm/scale" in shapes
    config = dict(
        vocabulary_size=shapes["llm/embedder/input_embedding"][0],
        image_size=int(round(positions**0.5)) * patch,
        num_layers=num_layers,
        num_query_heads=num_heads,
        num_key_value_heads=shapes["llm/layers/attn/kv_einsum/w"][2],
        hidden_dim=hidden,
        ffw_hidden_dim=shapes["llm/layers/mlp/linear"][1],
        head_dim=head_dim,
        vit_patch_size=patch,
        vit_num_heads=vit_heads,
        vit_hidden_dim=vit_hidden,
        vit_num_layers=vit_layers,
        vit_intermediate_dim=shapes[VISION + "MlpBlock_0/Dense_0/kernel"][-1],
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


def _conversions(config):
    """`(big_vision name, convert)`; `convert(array)` lists `(path, value)`."""
    def per_layer(template, transform=lambda v: v):
        return lambda stacked: [
            (template.format(i), transform(layer)) for i, layer in enumerate(stacked)
        ]

    def single(path, transform=lambda v: v):
        return lambda value: [(path, transform(value))]

    vit = "vision_encoder/block_{}/"
    table = [
        ("img/embedding/kernel", single("vision_encoder/patch_embedding/kernel")),
        ("img/embedding/bias", single("vision_encoder/patch_embedding/bias")),
        ("img/pos_embedding", single(
            "vision_encoder/position_embedding", lambda v: v.reshape(v.shape[-2:]))),
        ("img/Transformer/encoder_norm/scale", single("vision_encoder/encoder_norm/gamma")),
        ("img/Transformer/encoder_norm/bias", single("vision_encoder/encoder_norm/beta")),
        ("img/head/kernel", single("vision_encoder/projector/kernel")),
        ("img/head/bias", single("vision_encoder/projector/bias")),
    ]
    for norm, ours in (("LayerNorm_0", "attention_norm"), ("LayerNorm_1", "mlp_norm")):
        for kind, variable in (("scale", "gamma"), ("bias", "beta")):
            table.append((f"{VISION}{norm}/{kind}", per_layer(f"{vit}{ours}/{variable}")))
    for layer, ours in (("query", "query"), ("key", "key"), ("value", "value"),
                        ("out", "attention_output")):
        for kind in ("kernel", "bias"):
            table.append((f"{ATTENTION}{layer}/{kind}", per_layer(f"{vit}{ours}/{kind}")))
    for dense, ours in (("Dense_0", "mlp_in"), ("Dense_1", "mlp_out")):
        for kind in ("kernel", "bias"):
            table.append((f"{VISION}MlpBlock_0/{dense}/{kind}", per_layer(f"{vit}{ours}/{kind}")))

    block = "decoder_block_{}/"

    def heads_first(v):  # (N, D, H) -> (D, N, H)
        return v.transpose(1, 0, 2)

    def key_and_value(stacked):  # (L, 2, K, D, H)
        return [
            (f"decoder_block_{i}/attention/{name}/kernel", heads_first(layer[j]))
            for i, layer in enumerate(stacked)
            for j, name in enumerate(("key", "value"))
        ]

    def gate_and_up(stacked):  # (L, 2, D, F)
        return [
            (f"decoder_block_{i}/{name}/kernel", layer[j])
            for i, layer in enumerate(stacked)
            for j, name in enumerate(("gate", "up"))
        ]

    table += [
        ("llm/embedder/input_embedding", single("token_embedding/embeddings")),
        ("llm/final_norm/scale", single("final_norm/scale")),
        ("llm/layers/attn/q_einsum/w", per_layer(f"{block}attention/query/kernel", heads_first)),
        ("llm/layers/attn/kv_einsum/w", key_and_value),
        ("llm/layers/attn/attn_vec_einsum/w",
         per_layer(f"{block}attention/attention_output/kernel")),
        ("llm/layers/mlp/gating_einsum", gate_and_up),
        ("llm/layers/mlp/linear", per_layer(f"{block}down/kernel")),
    ]
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.get("use_post_norms"):
        norms += ["post_attention_norm", "post_ffw_norm"]
    for norm in norms:
        table.append((f"llm/layers/{norm}/scale", per_layer(f"{block}{norm}/scale")))
    return table


def _assignments(reader, config):
    """`(our path, array, big_vision name)`, one checkpoint array at a time."""
    for name, convert in _conversions(config):
        for path, value in convert(reader.load(name)):
            yield path, value, name


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

    reader = NpzReader(path)
    try:
        config = backbone_config(reader.shapes, query_pre_attn_scalar, sliding_window)
        backbone = PaliGemmaBackbone(**config, dtype=dtype)
        assign_weights(backbone, _assignments(reader, config))
    except KeyError as error:
        raise ValueError(
            f"`{path}` is missing the big_vision parameter {error}."
        ) from None
    return backbone
