"""Guards for `save_to_preset`: never overwrite a preset the user saved,
never save a model that would not reload the same."""

import os


def check_preset_dir(preset_dir, overwrite):
    """Raise unless `preset_dir` is missing, empty, or `overwrite` is True.

    keras-hub's saver writes into an existing directory, replacing files
    and leaving stale ones beside them; our `save_to_preset` calls this
    first so a saved preset is only replaced on request.
    """
    if overwrite or not os.path.exists(preset_dir):
        return
    if not os.path.isdir(preset_dir):
        raise FileExistsError(
            f"`preset_dir` {preset_dir!r} exists and is not a directory."
        )
    if os.listdir(preset_dir):
        raise FileExistsError(
            f"`preset_dir` {preset_dir!r} is not empty; pass "
            "`overwrite=True` to replace the preset saved there."
        )


def refuse_int4(backbone):
    """Raise if `backbone` has int4-quantized layers.

    Measured with Keras 3.15: a reloaded int4 model's logits move by up to
    0.05, so saving one would give back a different model.
    """
    if any(
        getattr(layer, "quantization_mode", None) == "int4"
        for layer in backbone._flatten_layers(include_self=False)
    ):
        raise ValueError(
            "int4-quantized backbones do not reload exactly with this "
            "Keras version; save the float (or int8) model and call "
            "`quantize('int4')` after loading."
        )
