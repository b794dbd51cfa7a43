"""Measure the peak memory of converting a full-size checkpoint to our preset.

Writes a random-weight checkpoint with the architecture of a registry
preset, in bfloat16 like the published ones, one block of rows at a time
(shapes come from models built on torch's meta device, so nothing of full
size is ever held):

- `--from hf`: a transformers directory (`config.json`, `model.safetensors`);
- `--from keras_hub`: a keras-hub preset (`config.json`, `model.weights.h5`
  in Keras' layout, the tiny preset's vocabulary).

Then runs `tools/convert_checkpoint.py` on it in a fresh process and
reports that process's peak RSS against the size of the float32 weights.

    python tools/measure_conversion_memory.py [--from hf|keras_hub] \\
        [--preset pali_gemma2_pt_3b_224] [--workdir /tmp/paligemma_memory] \\
        [--backend jax]
"""

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # meta-device shapes below
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
TINY_VOCABULARY = os.path.join(
    REPO, "presets", "pali_gemma_tiny_random", "assets", "tokenizer", "vocabulary.spm"
)


def meta_backbone(preset_name):
    """Our backbone for a registry preset, on torch's meta device."""
    import keras

    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma.presets import get_preset

    with keras.device("meta"):
        return PaliGemmaBackbone(**get_preset(preset_name)["config"])


def random_blocks(shape, rng):
    """Random bfloat16 values of `shape`, a block of leading rows at a time."""
    import ml_dtypes

    from keras_paligemma.checkpoints.in_place import rows_per_block

    rows = rows_per_block(shape, 4)
    for start in range(0, shape[0], rows):
        block_shape = (min(rows, shape[0] - start), *shape[1:])
        values = rng.standard_normal(block_shape, dtype="float32") * 0.02
        yield start, values.astype(ml_dtypes.bfloat16)


def write_hf_checkpoint(backbone, directory, rng):
    """A transformers directory: config.json and a bfloat16 safetensors."""
    import torch
    import transformers

    from keras_paligemma.checkpoints.transformers_export import transformers_config

    config = transformers_config(backbone)
    with torch.device("meta"):
        model = transformers.PaliGemmaForConditionalGeneration(
            transformers.PaliGemmaConfig(**config)
        )
    shapes = {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()
        if not name.startswith("lm_head")
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for shape in shapes.values():
            for _, block in random_blocks(shape, rng):
                f.write(block.tobytes())


def write_keras_hub_preset(backbone, directory, rng):
    """A keras-hub preset: config.json, bfloat16 model.weights.h5, vocabulary."""
    import h5py
    import keras
    import keras_hub
    import ml_dtypes

    from keras_paligemma.checkpoints.keras_hub import keras_hub_config
    from keras_paligemma.checkpoints.weights_file import keras_layout

    with keras.device("meta"):
        source = keras_hub.models.PaliGemmaBackbone(
            **keras_hub_config(backbone.get_config())
        )
    config = keras.saving.serialize_keras_object(source)
    config.pop("build_config", None)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    with h5py.File(os.path.join(directory, "model.weights.h5"), "w") as f:
        for group_path, attributes, values in keras_layout(source):
            group = f.require_group(group_path)
            group.attrs.update(attributes)
            for key, variable in values.items():
                shape = tuple(variable.shape)
                dataset = group.create_dataset(key, shape=shape, dtype=ml_dtypes.bfloat16)
                dataset.attrs["dtype"] = "bfloat16"
                for start, block in random_blocks(shape, rng):
                    dataset[start : start + len(block)] = block
    tokenizer = os.path.join(directory, "assets", "tokenizer")
    os.makedirs(tokenizer)
    shutil.copy(TINY_VOCABULARY, tokenizer)


def main():
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_format", default="hf",
                        choices=("hf", "keras_hub"))
    parser.add_argument("--preset", default="pali_gemma2_pt_3b_224")
    parser.add_argument("--workdir", default="/tmp/paligemma_memory")
    parser.add_argument("--backend", default="jax")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    source = os.path.join(args.workdir, args.source_format)
    os.makedirs(source)
    backbone = meta_backbone(args.preset)
    params = backbone.count_params()
    started = time.perf_counter()
    writer = write_hf_checkpoint if args.source_format == "hf" else write_keras_hub_preset
    writer(backbone, source, np.random.default_rng(0))
    print(f"wrote a random {args.preset} {args.source_format} checkpoint "
          f"({params:,} parameters) in {time.perf_counter() - started:.0f} s",
          flush=True)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
         "--from", args.source_format, source,
         "--to", os.path.join(args.workdir, "ours")],
        env={**os.environ, "KERAS_BACKEND": args.backend},
        capture_output=True, text=True,
    )
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    read_mib = float(re.search(r"peak RSS so far (\d+) MiB", result.stderr).group(1))
    peak_mib = float(re.search(r"peak RSS (\d+) MiB\.", result.stderr).group(1))
    weights_mib = params * 4 / 2**20
    print(f"{args.source_format} -> ours on {args.backend}: peak RSS "
          f"{peak_mib:,.0f} MiB ({read_mib:,.0f} MiB while reading); float32 "
          f"weights {weights_mib:,.0f} MiB; ratio {peak_mib / weights_mib:.2f}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
