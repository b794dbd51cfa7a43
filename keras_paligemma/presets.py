"""The official PaliGemma checkpoints: configs, sizes and where to get them.

`PaliGemmaCausalLM.presets` (and `PaliGemmaBackbone.presets`) list them;
`from_preset("pali_gemma2_mix_3b_224")` downloads the Kaggle keras preset
through `kagglehub` (cached) and loads it; `from_preset("hf://google/...")`
downloads a transformers repository through `huggingface_hub` (cached) and
converts it on the fly.

Parameter counts are the official ones and are checked against the built
architecture in the tests. `sliding_window` is `None` (full attention), as
big_vision trained PaliGemma 2; the windowed variant of transformers only
differs past 4096 tokens (896 px).
"""

import difflib
import json
import os

VOCABULARY_SIZE = 257152

_DECODERS = {
    # Gemma 2B (PaliGemma 1).
    "gemma_2b": dict(
        num_layers=18, num_query_heads=8, num_key_value_heads=1,
        hidden_dim=2048, ffw_hidden_dim=16384, head_dim=256,
    ),
    # Gemma 2 2B / 9B / 27B (PaliGemma 2).
    "gemma2_2b": dict(
        num_layers=26, num_query_heads=8, num_key_value_heads=4,
        hidden_dim=2304, ffw_hidden_dim=9216, head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2_9b": dict(
        num_layers=42, num_query_heads=16, num_key_value_heads=8,
        hidden_dim=3584, ffw_hidden_dim=14336, head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2_27b": dict(
        num_layers=46, num_query_heads=32, num_key_value_heads=16,
        hidden_dim=4608, ffw_hidden_dim=36864, head_dim=128,
        query_pre_attn_scalar=144,
    ),
}
_GEMMA2 = dict(
    use_post_norms=True, attention_logit_softcap=50.0, final_logit_softcap=30.0
)
# Official parameter counts at 224 px; 448 px adds 884,736 position
# embeddings and 896 px adds 4,423,680.
_PARAMS_224 = {
    "gemma_2b": 2_923_335_408,
    "gemma2_2b": 3_032_094_960,
    "gemma2_9b": 9_662_409_456,
    "gemma2_27b": 27_650_192_112,
}
_EXTRA_POSITIONS = {224: 0, 448: 884_736, 896: 4_423_680}


def _entry(decoder, image_size, description, kaggle, hf_repo, length=256):
    config = dict(
        vocabulary_size=VOCABULARY_SIZE,
        image_size=image_size,
        **_DECODERS[decoder],
        **(_GEMMA2 if decoder != "gemma_2b" else {}),
    )
    return {
        "description": description,
        "config": config,
        "params": _PARAMS_224[decoder] + _EXTRA_POSITIONS[image_size],
        "image_size": image_size,
        "sequence_length": length,
        "kaggle_handle": kaggle,
        "hf_repo": hf_repo,
    }


def _table():
    table = {}
    kaggle1 = "kaggle://keras/paligemma/keras/{}/4"
    for kind, sizes in (("mix", (224, 448)), ("pt", (224, 448, 896))):
        for size in sizes:
            name = f"pali_gemma_3b_{'mix_' if kind == 'mix' else ''}{size}"
            table[name] = _entry(
                "gemma_2b", size,
                f"PaliGemma 3B, {'mix (ready to use)' if kind == 'mix' else 'pre-trained'}, {size} px.",
                kaggle1.format(name), f"google/paligemma-3b-{kind}-{size}",
            )
    kaggle2 = "kaggle://keras/paligemma2/keras/{}/{}"
    sizes_by_decoder = {"3b": "gemma2_2b", "10b": "gemma2_9b", "28b": "gemma2_27b"}
    versions = {"3b": 2, "10b": 3, "28b": 3}
    for scale, decoder in sizes_by_decoder.items():
        for size in (224, 448, 896):
            name = f"pali_gemma2_pt_{scale}_{size}"
            version = 4 if name == "pali_gemma2_pt_28b_224" else versions[scale]
            table[name] = _entry(
                decoder, size, f"PaliGemma 2 {scale.upper()}, pre-trained, {size} px.",
                kaggle2.format(name, version), f"google/paligemma2-{scale}-pt-{size}",
            )
        for size in (224, 448):
            name = f"pali_gemma2_mix_{scale}_{size}"
            kaggle_name = f"pali_gemma2_28b_mix_{size}" if scale == "28b" else name
            table[name] = _entry(
                decoder, size, f"PaliGemma 2 {scale.upper()}, mix (ready to use), {size} px.",
                kaggle2.format(kaggle_name, versions[scale]),
                f"google/paligemma2-{scale}-mix-{size}",
            )
    table["pali_gemma2_ft_docci_3b_448"] = _entry(
        "gemma2_2b", 448, "PaliGemma 2 3B fine-tuned on DOCCI (long captions), 448 px.",
        kaggle2.format("pali_gemma_2_ft_docci_3b_448", 2),
        "google/paligemma2-3b-ft-docci-448", length=512,
    )
    table["pali_gemma2_ft_docci_10b_448"] = _entry(
        "gemma2_9b", 448, "PaliGemma 2 10B fine-tuned on DOCCI (long captions), 448 px.",
        kaggle2.format("pali_gemma2_ft_docci_10b_448", 3),
        "google/paligemma2-10b-ft-docci-448", length=512,
    )
    return table


PRESETS = _table()


def get_preset(name):
    """The registry entry for `name`, or a `ValueError` with close matches."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, list(PRESETS), n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown PaliGemma preset {name!r}.{hint} Known presets: "
        "`PaliGemmaCausalLM.presets`; local directories load too."
    )


def download_kaggle(handle):
    """Download (or reuse the cache of) a Kaggle preset; clear errors."""
    import kagglehub

    path = handle.removeprefix("kaggle://")
    try:
        return kagglehub.model_download(path)
    except Exception as error:  # kagglehub raises many kinds.
        raise RuntimeError(
            f"Could not download {handle}: {type(error).__name__}: {error}\n"
            "Check the network, set KAGGLE_USERNAME and KAGGLE_KEY (or "
            "~/.kaggle/kaggle.json), and accept the Gemma licence on the "
            "model's Kaggle page. Or pass a local preset directory."
        ) from error


def download_hf(handle):
    """Download (or reuse the cache of) an `hf://org/repo` snapshot."""
    from huggingface_hub import snapshot_download

    repo = handle.removeprefix("hf://")
    try:
        return snapshot_download(
            repo, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"]
        )
    except Exception as error:  # huggingface_hub raises many kinds.
        raise RuntimeError(
            f"Could not download {handle}: {type(error).__name__}: {error}\n"
            "Check the network, log in (`huggingface-cli login` or HF_TOKEN) "
            "and accept the Gemma licence on the model's Hugging Face page. "
            "Or pass a local checkpoint directory."
        ) from error


def _saved_policy_map(preset):
    """The serialized `DTypePolicyMap` of a quantized preset directory.

    `None` for float presets and for anything but a local directory.
    """
    config_file = os.path.join(str(preset), "config.json")
    if not os.path.isfile(config_file):
        return None
    with open(config_file) as f:
        dtype = json.load(f).get("config", {}).get("dtype")
    if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicyMap":
        return dtype
    return None


class PresetTable:
    """Descriptor: `cls.presets` -> `{name: entry}` of the registry."""

    def __get__(self, instance, owner):
        return dict(PRESETS)


class PresetLoading:
    """Mixin giving a model class the registry and foreign-format loading.

    Set `preset_kind` to `"backbone"` or `"causal_lm"`.
    """

    presets = PresetTable()
    preset_kind = None

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Load from a preset name, handle, directory or file.

        `preset` is a name from `presets` (downloaded from Kaggle through
        kagglehub and cached), a `kaggle://` handle, an `hf://org/repo`
        transformers repository (downloaded through huggingface_hub and
        cached), one of our preset directories, a keras-hub PaliGemma
        preset directory (e.g. a Kaggle `keras/paligemma*` download), a
        transformers checkpoint directory (`config.json` + `*.safetensors`;
        the causal LM also needs `tokenizer.model`), or (backbone only) a
        big_vision `.npz` file. Foreign formats are converted on the fly.
        Other keyword arguments go to keras-hub's loader.
        """
        from keras_paligemma.checkpoints.dispatch import load_foreign

        model = load_foreign(cls.preset_kind, preset, dtype=kwargs.get("dtype"))
        if model is not None:
            return model
        if cls.preset_kind == "backbone" and kwargs.get("dtype") is None:
            # keras-hub 0.32's backbone loader replaces the saved dtype with
            # `None`, which builds a quantized preset as a float model that
            # cannot take its weights; pass the saved policy map instead.
            kwargs["dtype"] = _saved_policy_map(preset)
        model = super().from_preset(preset, load_weights=load_weights, **kwargs)
        backbone = model if cls.preset_kind == "backbone" else model.backbone
        if load_weights and backbone.lora_enabled:
            from keras_hub.src.utils.preset_utils import get_file

            from keras_paligemma.models.fine_tuning import LORA_ADAPTERS_FILE

            backbone.load_lora_weights(get_file(preset, LORA_ADAPTERS_FILE))
        return model
