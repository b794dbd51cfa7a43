"""Fine-tuning controls of `PaliGemmaBackbone`: LoRA and freezing.

LoRA adds a trainable low-rank update `(alpha / rank) * A @ B` to chosen
projection kernels and freezes every other weight. Targets are groups of
layers (or exact layer paths):

- `"attention"` (the default): the decoder's query, key, value and output
  projections;
- `"ffw"`: the decoder's gate, up and down projections;
- `"vision"`: the SigLIP encoder's attention and MLP projections.

A LoRA backbone saves to a preset as its base weights plus the adapters
(`lora_adapters.lora.h5`) and loads back as the same LoRA backbone;
`merge_lora()` folds the adapters into the kernels for serving.

>>> from keras_paligemma import PaliGemmaBackbone
>>> backbone = PaliGemmaBackbone.from_preset("presets/pali_gemma_tiny_random")
>>> backbone.enable_lora(4)
>>> sorted({v.name for v in backbone.trainable_weights})
['lora_kernel_a', 'lora_kernel_b']
>>> backbone.merge_lora()
>>> backbone.lora_enabled
False
"""

import contextlib
import json
import os
import re

import numpy as np
from keras import ops

from keras_paligemma.layers.kernel_layout import DECODER_KERNEL_LAYOUT
from keras_paligemma.layers.kernel_layout import permutation

LORA_ADAPTERS_FILE = "lora_adapters.lora.h5"
LORA_TARGETS = {
    "attention": r"decoder_block_\d+/attention/(query|key|value|attention_output)",
    "ffw": r"decoder_block_\d+/(gate|up|down)",
    "vision": r"vision_encoder/block_\d+/"
    r"(query|key|value|attention_output|mlp_in|mlp_out)",
}


class FineTuning:
    """Mixin of `PaliGemmaBackbone`: `enable_lora`, `merge_lora`, freezing."""

    @property
    def lora_enabled(self):
        """Whether LoRA adapters are active."""
        return self.lora_config is not None

    @property
    def lora_config(self):
        """`{"rank", "lora_alpha", "targets"}` of the adapters, or `None`."""
        saved = getattr(self, "_lora_json", None)
        return None if saved is None else json.loads(saved)

    def lora_layers(self):
        """The layers with adapters, in a stable order."""
        if not self.lora_enabled:
            return []
        return [
            layer
            for layer in self._flatten_layers(include_self=False)
            if getattr(layer, "lora_enabled", False)
        ]

    def enable_lora(self, rank, targets=None, lora_alpha=None):
        """Freeze the backbone and train low-rank adapters on `targets`.

        Args:
            rank: rank of the adapters (4 or 8 is typical).
            targets: list of groups (`"attention"`, `"ffw"`, `"vision"`) or
                exact layer paths such as
                `"decoder_block_0/attention/query"`; `None` means
                `["attention"]`.
            lora_alpha: scale numerator, the update is
                `lora_alpha / rank * A @ B`; defaults to `rank`.
        """
        if self.lora_enabled:
            raise ValueError(
                "LoRA is already enabled on this backbone; call "
                "`merge_lora()` first to start new adapters."
            )
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"`rank` must be a positive int; got {rank!r}.")
        if targets is None:
            targets = ["attention"]
        if isinstance(targets, str) or not targets:
            raise TypeError(
                f"`targets` must be a non-empty list of names; got {targets!r}."
            )
        targets = list(targets)
        layers = self._lora_target_layers(targets)
        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        for layer in layers:
            layer.trainable = True
            layer.enable_lora(rank, lora_alpha=lora_alpha)
            if getattr(layer, "bias", None) is not None:
                layer.bias.trainable = False
        self._lora_json = json.dumps(
            {"rank": rank, "lora_alpha": layers[0].lora_alpha, "targets": targets}
        )

    def _lora_target_layers(self, targets):
        patterns = []
        for target in targets:
            if target in LORA_TARGETS:
                patterns.append(LORA_TARGETS[target])
            else:
                patterns.append(re.escape(target))
        pattern = re.compile(r"(^|/)(" + "|".join(patterns) + r")$")
        layers = [
            layer
            for layer in self._flatten_layers(include_self=False)
            if hasattr(layer, "enable_lora") and pattern.search(layer.path)
        ]
        unknown = [
            target
            for target in targets
            if target not in LORA_TARGETS
            and not any(layer.path.endswith(target) for layer in layers)
        ]
        if unknown:
            raise ValueError(
                f"Unknown LoRA targets {unknown}: use the groups "
                f"{sorted(LORA_TARGETS)} or layer paths such as "
                "'decoder_block_0/attention/query'."
            )
        return layers

    def merge_lora(self):
        """Fold the adapters into the kernels and drop them.

        The backbone computes the same function afterwards (up to float32
        rounding) without the LoRA overhead; every layer is trainable
        again, as before `enable_lora`.
        """
        if not self.lora_enabled:
            raise ValueError("`merge_lora()` needs `enable_lora(rank)` first.")
        for layer in self.lora_layers():
            base = to_float32(layer._kernel)
            update = np.matmul(
                to_float32(layer.lora_kernel_a), to_float32(layer.lora_kernel_b)
            )
            scale = layer.lora_alpha / layer.lora_rank
            layer._kernel.assign(base + scale * update)
            layer._kernel.trainable = True
            del layer.lora_kernel_a
            del layer.lora_kernel_b
            layer.lora_enabled = False
            layer.lora_rank = None
        self._lora_json = None
        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = True

    def freeze_vision_encoder(self):
        """Train the projector and the decoder only (the HF blog recipe).

        The SigLIP encoder's weights are frozen; the linear projector from
        image features to the decoder stays trainable. `backbone.trainable
        = True` undoes it.
        """
        projector = self.vision_encoder.projector
        keep = {id(v) for v in projector.weights}
        for variable in self.vision_encoder.weights:
            variable.trainable = id(variable) in keep

    def enable_remat(self, vision=True):
        """Recompute block activations in the backward pass (saves memory).

        Every decoder block (and, with `vision=True`, every SigLIP block)
        keeps only its inputs for backpropagation and recomputes the rest,
        trading about one extra forward pass for activation memory that no
        longer grows with the number of layers: use it for long sequences
        (448/896 images, long answers). Gradients are unchanged. It works
        through `keras.remat` on every backend (`jax.checkpoint`,
        `tf.recompute_grad`, `torch.utils.checkpoint`); decoding in
        `generate` has no backward pass and runs the blocks unwrapped.
        """
        from keras.src.backend.common.remat import RematMode

        blocks = list(self.decoder_blocks)
        if vision:
            blocks += list(self.vision_encoder.encoder_blocks)
        for block in blocks:
            object.__setattr__(
                block, "_remat_mode", RematMode("full", None, None)
            )

    def save_lora_weights(self, filepath):
        """Write the adapters (and rank, alpha, targets) to a `.lora.h5`."""
        import h5py

        if not self.lora_enabled:
            raise ValueError(
                "There are no LoRA adapters to save; call `enable_lora` first."
            )
        if not str(filepath).endswith(".lora.h5"):
            raise ValueError(
                f"`filepath` must end in `.lora.h5`; got {filepath!r}."
            )
        with h5py.File(filepath, "w") as file:
            file.attrs["lora"] = self._lora_json
            file.attrs["decoder_kernel_layout"] = DECODER_KERNEL_LAYOUT
            for layer in self.lora_layers():
                group = file.create_group(layer.path)
                group["a"] = ops.convert_to_numpy(layer.lora_kernel_a)
                group["b"] = ops.convert_to_numpy(layer.lora_kernel_b)

    def load_lora_weights(self, filepath):
        """Read adapters saved by `save_lora_weights`.

        LoRA is enabled with the file's rank, alpha and targets when the
        backbone has no adapters yet; otherwise they must match.
        """
        import h5py

        with h5py.File(filepath, "r") as file:
            saved = json.loads(file.attrs["lora"])
            layout = file.attrs.get("decoder_kernel_layout")
            decoder = [
                layer.path
                for layer in self._lora_target_layers(saved["targets"])
                if permutation(layer.path + "/kernel")
            ]
            if layout != DECODER_KERNEL_LAYOUT and decoder:
                # The two layouts factor the update over different axes.
                raise ValueError(
                    f"{filepath} holds adapters of input-first decoder "
                    f"kernels (e.g. {decoder[0]}), saved before the decoder "
                    "stored its kernels output-first; they cannot be "
                    "converted: train them again."
                )
            if not self.lora_enabled:
                self.enable_lora(**saved)
            elif self.lora_config != saved:
                raise ValueError(
                    f"{filepath} holds LoRA {saved}, but this backbone has "
                    f"{self.lora_config}; both must match."
                )
            for layer in self.lora_layers():
                if layer.path not in file:
                    raise ValueError(f"{filepath} has no adapter for {layer.path}.")
                layer.lora_kernel_a.assign(file[layer.path]["a"][()])
                layer.lora_kernel_b.assign(file[layer.path]["b"][()])

    @contextlib.contextmanager
    def lora_kept_apart(self, preset_dir):
        """Inside, Keras saves base kernels; after, the adapters are written.

        Keras saves a LoRA kernel merged; a preset keeps base weights and
        adapters apart (`lora_adapters.lora.h5`), so loading it gives the
        same LoRA backbone back.
        """
        layers = self.lora_layers()
        for layer in layers:
            layer.lora_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.lora_enabled = True
        if layers:
            self.save_lora_weights(os.path.join(preset_dir, LORA_ADAPTERS_FILE))


def to_float32(variable):
    """A variable's value as a float32 NumPy array."""
    return np.asarray(ops.convert_to_numpy(ops.cast(variable, "float32")))
