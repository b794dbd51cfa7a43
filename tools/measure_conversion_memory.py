"""Measure the peak memory of converting a full-size transformers checkpoint.

Writes a random-weight transformers checkpoint (bfloat16 safetensors,
streamed tensor by tensor) with the architecture of a registry preset, then
runs `tools/convert_checkpoint.py --from hf` on it in a fresh process and
reports its peak RSS against the size of the float32 weights.

    python tools/measure_conversion_memory.py [--preset pali_gemma2_pt_3b_224] \\
        [--workdir /tmp/paligemma_memory] [--backend jax]
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


def tensor_shapes(preset_name):
    """transformers state-dict names and shapes, from meta-device models."""
    import keras
    import torch
    import transformers

    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma.checkpoints.transformers_export import transformers_config
    from keras_paligemma.presets import get_preset

    entry = get_preset(preset_name)
    with keras.device("meta"):
        backbone = PaliGemmaBackbone(**entry["config"])
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
    return config, shapes, backbone.count_params()


def write_random_safetensors(path, shapes, seed=0):
    """A bfloat16 safetensors file written one tensor at a time."""
    import ml_dtypes
    import numpy as np

    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape in shapes.items():
            values = rng.standard_normal(shape, dtype="float32") * 0.02
            f.write(values.astype(ml_dtypes.bfloat16).tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pali_gemma2_pt_3b_224")
    parser.add_argument("--workdir", default="/tmp/paligemma_memory")
    parser.add_argument("--backend", default="jax")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    source = os.path.join(args.workdir, "hf")
    os.makedirs(source)
    config, shapes, params = tensor_shapes(args.preset)
    started = time.perf_counter()
    write_random_safetensors(os.path.join(source, "model.safetensors"), shapes)
    with open(os.path.join(source, "config.json"), "w") as f:
        json.dump(config, f)
    print(f"wrote a random {args.preset} checkpoint ({params:,} parameters) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"),
         "--from", "hf", source, "--to", os.path.join(args.workdir, "ours")],
        env={**os.environ, "KERAS_BACKEND": args.backend},
        capture_output=True, text=True,
    )
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    peak_mib = float(re.search(r"peak RSS (\d+) MiB", result.stderr).group(1))
    weights_mib = params * 4 / 2**20
    print(f"conversion on {args.backend}: peak RSS {peak_mib:,.0f} MiB; float32 "
          f"weights {weights_mib:,.0f} MiB; ratio {peak_mib / weights_mib:.2f}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
