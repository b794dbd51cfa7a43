"""Recognise foreign checkpoint directories given to `from_preset`.

`PaliGemmaBackbone.from_preset` and `PaliGemmaCausalLM.from_preset` call
`load_foreign` first: a keras-hub preset directory or a transformers
checkpoint directory is converted on the fly; anything else (our own
presets) goes to keras-hub's preset loader as usual.
"""

import os

from keras_paligemma import presets
from keras_paligemma.checkpoints import big_vision as big_vision_checkpoint
from keras_paligemma.checkpoints import keras_hub as keras_hub_checkpoint
from keras_paligemma.checkpoints import transformers as transformers_checkpoint


def load_foreign(kind, preset, dtype=None):
    """A `"backbone"` or `"causal_lm"` from a foreign preset, else `None`.

    Registry names (`keras_paligemma.presets.PRESETS`) and `kaggle://`
    handles are downloaded through kagglehub, `hf://` handles through
    huggingface_hub, then converted like the local directories.
    """
    if isinstance(preset, str) and not os.path.exists(preset):
        if preset.startswith("kaggle://"):
            preset = presets.download_kaggle(preset)
        elif preset.startswith("hf://"):
            preset = presets.download_hf(preset)
        elif "://" not in preset:
            entry = presets.get_preset(preset)
            preset = presets.download_kaggle(entry["kaggle_handle"])
    if str(preset).endswith(".npz") and os.path.isfile(preset):
        if kind != "backbone":
            raise ValueError(
                "A big_vision .npz holds weights only: load it with "
                "`PaliGemmaBackbone.from_preset` and add a preprocessor."
            )
        return big_vision_checkpoint.load_backbone(preset, dtype=dtype)
    if not isinstance(preset, (str, os.PathLike)) or not os.path.isdir(preset):
        return None
    if keras_hub_checkpoint.is_keras_hub_preset(preset):
        if kind == "backbone":
            return keras_hub_checkpoint.load_backbone(preset, dtype=dtype)
        return keras_hub_checkpoint.load_causal_lm(preset, dtype=dtype)
    if transformers_checkpoint.is_transformers_checkpoint(preset):
        if kind == "backbone":
            return transformers_checkpoint.load_backbone(preset, dtype=dtype)
        return transformers_checkpoint.load_causal_lm(preset, dtype=dtype)
    return None
