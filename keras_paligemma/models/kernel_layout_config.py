"""The backbone config's record of how the decoder stores its kernels.

Configs written since the decoder stores its kernels output-first
(`layers/kernel_layout.py`) say so as `decoder_kernel_layout`; a config
without it comes from an earlier preset, whose weights file holds them
input-first: such a backbone transposes them as it loads that file, and
saves the current layout.
"""

from keras_paligemma.layers.kernel_layout import DECODER_KERNEL_LAYOUT
from keras_paligemma.layers.kernel_layout import read_input_first_files


class KernelLayoutConfig:
    """Mixin of `PaliGemmaBackbone`: `decoder_kernel_layout` in its config.

    Example:

    >>> from keras_paligemma import PaliGemmaBackbone
    >>> backbone = PaliGemmaBackbone.from_preset("presets/pali_gemma_tiny_random")
    >>> backbone.get_config()["decoder_kernel_layout"]
    'output_input'
    """

    def get_config(self):
        config = super().get_config()
        config["decoder_kernel_layout"] = DECODER_KERNEL_LAYOUT
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layout = config.pop("decoder_kernel_layout", None)
        if layout not in (None, DECODER_KERNEL_LAYOUT):
            raise ValueError(
                f"`decoder_kernel_layout` must be {DECODER_KERNEL_LAYOUT!r} "
                f"(or absent, for earlier presets); got {layout!r}: this "
                "config may come from a newer keras_paligemma."
            )
        model = super().from_config(config)
        if layout is None:
            read_input_first_files(model)
        return model
