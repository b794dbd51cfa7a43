"""Peak memory of generating with an int8 preset against a float32 one.

Builds a registry architecture (PaliGemma 2 3B-224 by default; or a
preset directory's) with
random weights once, saves it as a float32 backbone preset, quantizes it
to int8 (`quantize("int8")`, Keras weight quantization) and saves that
too. Then, for each preset, a fresh process loads it
(`PaliGemmaBackbone.from_preset`) and greedily generates a few tokens
after 256 image + 12 prompt tokens; its peak RSS (`ru_maxrss`, imports
included) is reported, with the int8/float32 ratio.

    KERAS_BACKEND=jax python tools/measure_int8_memory.py \\
        [--preset pali_gemma2_pt_3b_224] [--workdir /tmp/paligemma_int8] \\
        [--layers N] [--keep]

The build step holds the float32 model and its int8 copy at once (about
1.3x the float32 weights: 15 GB for 3B); the measured steps hold one.
`--keep` keeps the presets (and what they were built for); a later run
with the same `--preset` and `--layers` reuses them, any other run
refuses that `--workdir`.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

BUILT_FOR = "built_for.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def build(preset, layers, workdir):
    """Write `float32/` and `int8/` backbone presets with random weights."""
    import keras

    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma.presets import get_preset

    if os.path.isdir(preset):  # A preset directory: its backbone config.
        with open(os.path.join(preset, "config.json")) as f:
            config = json.load(f)["config"]
        for key in ("name", "trainable", "dtype", "lora"):
            config.pop(key, None)
    else:
        config = dict(get_preset(preset)["config"])
    if layers:
        config["num_layers"] = layers
    keras.utils.set_random_seed(0)
    backbone = PaliGemmaBackbone(**config, dtype="float32")
    backbone.save_to_preset(os.path.join(workdir, "float32"))
    backbone.quantize("int8")
    backbone.save_to_preset(os.path.join(workdir, "int8"))
    with open(os.path.join(workdir, BUILT_FOR), "w") as f:
        json.dump({"preset": preset, "layers": layers}, f)


def built_for(workdir):
    """What the presets in `workdir` were built from, or None."""
    path = os.path.join(workdir, BUILT_FOR)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def generate(preset_dir, new_tokens):
    """Load a backbone preset, generate greedily; print peak RSS as JSON."""
    import numpy as np

    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma import PaliGemmaCausalLM

    start = time.perf_counter()
    backbone = PaliGemmaBackbone.from_preset(preset_dir)
    loaded = time.perf_counter()
    causal_lm = PaliGemmaCausalLM(backbone)
    size = backbone.image_size
    rng = np.random.default_rng(0)
    token_ids = np.zeros((1, 12 + new_tokens), "int32")
    token_ids[0, :12] = rng.integers(3, min(backbone.vocabulary_size, 256000), 12)
    token_ids[0, 0] = 2
    out = causal_lm.generate(
        {
            "images": rng.uniform(-1, 1, (1, size, size, 3)).astype("float32"),
            "token_ids": token_ids,
            "padding_mask": token_ids != 0,
        },
        stop_token_ids=None,
    )
    print(json.dumps({
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": loaded - start,
        "generate_s": time.perf_counter() - loaded,
        "tokens": np.asarray(out["token_ids"])[0, 12:].tolist(),
    }))


def run_step(*args):
    """Run this script's step in a fresh process; return its JSON line."""
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True, text=True, check=False,
    )
    if result.returncode:
        raise RuntimeError(f"step {args} failed:\n{result.stderr[-3000:]}")
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pali_gemma2_pt_3b_224",
                        help="registry name, or a preset directory")
    parser.add_argument("--workdir", default="/tmp/paligemma_int8")
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--keep", action="store_true",
                        help="keep the presets in --workdir")
    parser.add_argument("--step", choices=["build", "generate"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--preset-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "build":
        return build(args.preset, args.layers, args.workdir)
    if args.step == "generate":
        return generate(args.preset_dir, args.new_tokens)

    wanted = {"preset": args.preset, "layers": args.layers}
    built = built_for(args.workdir) == wanted
    if not built and os.path.exists(args.workdir) and os.listdir(args.workdir):
        parser.error(
            f"--workdir {args.workdir} is not empty and holds no presets "
            f"built for {wanted}; give a new one"
        )
    os.makedirs(args.workdir, exist_ok=True)
    try:
        common = ["--preset", args.preset, "--workdir", args.workdir]
        if args.layers:
            common += ["--layers", str(args.layers)]
        if not built:  # Presets kept by an earlier `--keep` run are reused.
            run_step("--step", "build", *common)
        found = {}
        for name in ("float32", "int8"):
            found[name] = run_step(
                "--step", "generate", "--new-tokens", str(args.new_tokens),
                "--preset-dir", os.path.join(args.workdir, name))
            found[name]["weights_mib"] = sum(
                os.path.getsize(os.path.join(args.workdir, name, f))
                for f in os.listdir(os.path.join(args.workdir, name))
            ) / 2**20
        found["same_tokens"] = found["int8"]["tokens"] == found["float32"]["tokens"]
        found["ratio"] = (found["int8"]["peak_rss_mib"]
                          / found["float32"]["peak_rss_mib"])
        found["backend"] = os.environ.get("KERAS_BACKEND", "jax")
        found["preset"], found["layers"] = args.preset, args.layers
        print(json.dumps(found, indent=2))
        return found
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
