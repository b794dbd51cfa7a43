"""Benchmark PaliGemma generation against keras-hub, transformers and the floor.

Builds our `PaliGemmaCausalLM` with random float32 weights (PaliGemma 2
3B-224 widths by default; `--layers` / `--vit-layers` shrink the depth),
copies the same weights into keras-hub's `PaliGemmaCausalLM` (same Keras
backend) and transformers' `PaliGemmaForConditionalGeneration` (torch),
then measures, for each batch size, with 256 image + 12 prompt tokens and
greedy decoding without stop tokens:

- prefill: one forward pass over image + prompt (logits of the prompt);
- TTFT: `generate` of one new token (image encoding, prefill, one token);
- decode: `(time of N new tokens - time of 1) / (N - 1)`, ms per token;
- peak RSS while the model generates, and its increase over the start;
- compilations: traces of `generate_step` (0 where it runs eagerly),
  a one token shorter prompt included.

Models run interleaved (A B C A B C ...); each time is the best of
`--repeats`. The same run measures memory bandwidth and matmul throughput
for floors: decode = weight bytes per step / bandwidth, prefill = matmul
FLOPs / throughput (each or the other bound if larger). Prints markdown
tables; `--json` writes everything.

    KERAS_BACKEND=jax python tools/benchmark.py --layers 4 --vit-layers 4
    python tools/benchmark.py --small  # tiny widths: a smoke test
"""

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import h5py
import keras
import keras_hub
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_paligemma import PaliGemmaBackbone  # noqa: E402
from keras_paligemma import PaliGemmaCausalLM  # noqa: E402
from keras_paligemma.checkpoints.keras_hub import keras_hub_config  # noqa: E402
from keras_paligemma.checkpoints.keras_hub import our_variable  # noqa: E402
from keras_paligemma.checkpoints.transformers_export import (  # noqa: E402
    export_transformers,
)

PALIGEMMA2_3B_224 = dict(
    vocabulary_size=257152, image_size=224, num_layers=26,
    num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
    ffw_hidden_dim=9216, head_dim=256, vit_num_layers=27,
    query_pre_attn_scalar=256, use_post_norms=True,
    attention_logit_softcap=50.0, final_logit_softcap=30.0,
)
SMALL = dict(
    PALIGEMMA2_3B_224, vocabulary_size=1200, image_size=28, num_layers=2,
    num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
    ffw_hidden_dim=64, head_dim=8, query_pre_attn_scalar=8,
    vit_num_heads=2, vit_hidden_dim=32, vit_num_layers=2,
    vit_intermediate_dim=64,
)
PROMPT_LENGTH = 12
NEWLINE = 108


class PeakRss(threading.Thread):
    """Peak resident memory of this process inside a `with` block."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = self.peak = resident_bytes()
        self.running = True

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.join()

    def run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def seconds(function, repeats=1):
    """Best wall time of `function()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_hardware(bandwidth_mb, matmul_size):
    """Bandwidth (bytes/s) and matmul FLOP/s, with the backend and torch.

    Bandwidth: a matrix-vector product over a `bandwidth_mb` float32
    matrix (what a decode step does with each weight); matmul: square
    float32 matrices of side `matmul_size`.
    """
    ops = keras.ops
    rows, m = bandwidth_mb * 2**20 // (4 * 1024), matmul_size
    big, vector, a = ops.ones((rows, 1024)), ops.ones((1024,)), ops.ones((m, m))
    big_t, vector_t, a_t = torch.ones(rows, 1024), torch.ones(1024), torch.ones(m, m)
    with torch.no_grad():
        found = {
            "bandwidth_backend": rows * 4096 / seconds(
                lambda: ops.convert_to_numpy(ops.matmul(big, vector)), 5),
            "bandwidth_torch": rows * 4096 / seconds(
                lambda: (big_t @ vector_t).numpy(), 5),
            "matmul_backend": 2 * m**3 / seconds(
                lambda: ops.convert_to_numpy(ops.matmul(a, a)), 5),
            "matmul_torch": 2 * m**3 / seconds(lambda: (a_t @ a_t).numpy(), 5),
        }
    found["bandwidth"] = max(found["bandwidth_backend"], found["bandwidth_torch"])
    found["matmul"] = max(found["matmul_backend"], found["matmul_torch"])
    return found


def parameter_counts(backbone):
    """Weights per part: `vision` (encoder + projector), `decoder`, `embedding`."""
    parts = {"vision_encoder": "vision", "token_embedding": "embedding"}
    counts = {"vision": 0, "decoder": 0, "embedding": 0}
    for variable in backbone.weights:
        part = parts.get(variable.path.split("/")[0], "decoder")
        counts[part] += int(np.prod(variable.shape))
    return counts


def floors(backbone, batch, hardware):
    """Lower bounds in seconds for prefill, TTFT and one decode step."""
    counts = parameter_counts(backbone)
    bandwidth, matmul = hardware["bandwidth"], hardware["matmul"]
    image_tokens = backbone.num_image_tokens
    weight_bytes = 4 * sum(counts.values())
    prefill_flops = 2 * batch * (
        counts["vision"] * image_tokens
        + counts["decoder"] * (image_tokens + PROMPT_LENGTH)
        + counts["embedding"] * PROMPT_LENGTH
    )
    step_bytes = 4 * (counts["decoder"] + counts["embedding"])
    step_flops = 2 * batch * (counts["decoder"] + counts["embedding"])
    prefill = max(prefill_flops / matmul, weight_bytes / bandwidth)
    decode = max(step_bytes / bandwidth, step_flops / matmul)
    return {"prefill": prefill, "ttft": prefill + decode, "decode": decode}


def random_backbone(config, seed):
    """Our backbone with random weights, norm scales randomised too."""
    keras.utils.set_random_seed(seed)
    backbone = PaliGemmaBackbone(**config, dtype="float32")
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("scale"):
            variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return backbone


def keras_hub_causal_lm(backbone):
    """keras-hub's `PaliGemmaCausalLM` holding the weights of `backbone`.

    Our keras-hub converter maps each dataset of a keras-hub weights file
    to our variable; this writes our values into such a file (inverting
    the converter's reshapes and transposes) and loads it into keras-hub.
    """
    config = backbone.get_config()
    theirs = keras_hub.models.PaliGemmaBackbone(
        **keras_hub_config(config), dtype="float32"
    )
    ours = {v.path: v for v in backbone.weights}

    def value_for(name, shape):
        stand_in = np.broadcast_to(np.int32(0), shape)
        path, mapped = our_variable(name, stand_in, config)
        value = keras.ops.convert_to_numpy(ours[path])
        if mapped is stand_in:  # Stored as is.
            return value
        positions = np.arange(int(np.prod(shape))).reshape(shape)
        _, positions = our_variable(name, positions, config)
        out = np.empty(positions.size, value.dtype)
        out[positions.ravel()] = value.ravel()
        return out.reshape(shape)

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "model.weights.h5")
        theirs.save_weights(path)
        with h5py.File(path, "r+") as f:
            names = []
            f.visititems(lambda name, item: names.append(name)
                         if isinstance(item, h5py.Dataset) else None)
            for name in names:
                f[name][...] = value_for(name, f[name].shape)
        theirs.load_weights(path)
    return keras_hub.models.PaliGemmaCausalLM(backbone=theirs, preprocessor=None)


def transformers_model(backbone):
    """transformers' model with the weights of `backbone` (our exporter)."""
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as directory:
        export_transformers(backbone, directory, overwrite=True)
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32
        )
    return model.eval()


class KerasRunner:
    """Times a Keras `CausalLM` (ours or keras-hub's) on token inputs."""

    def __init__(self, name, causal_lm):
        self.name, self.causal_lm, self.traces = name, causal_lm, 0
        step = causal_lm.generate_step

        def counting_step(inputs, stop_token_ids=None):
            self.traces += 1
            return step(inputs, stop_token_ids)

        causal_lm.generate_step = counting_step
        causal_lm.compile(sampler="greedy")  # Also drops compiled functions.

    @property
    def compilations(self):
        return 0 if keras.config.backend() == "torch" else self.traces

    def prefill(self, images, prompts):
        ones = np.ones_like(prompts)
        self.causal_lm.predict_on_batch({
            "images": images, "token_ids": prompts, "padding_mask": ones,
            "response_mask": np.zeros_like(prompts),
        })

    def generate(self, images, prompts, new_tokens):
        batch, length = prompts.shape
        token_ids = np.zeros((batch, length + new_tokens), "int32")
        token_ids[:, :length] = prompts
        out = self.causal_lm.generate(
            {"images": images, "token_ids": token_ids,
             "padding_mask": token_ids != 0},
            stop_token_ids=None,
        )
        return np.asarray(out["token_ids"])[:, length:]


class TransformersRunner:
    """Times transformers' PaliGemma (eager torch, `no_grad`)."""

    name, compilations = "transformers", 0

    def __init__(self, model, num_image_tokens):
        self.model, self.num_image_tokens = model, num_image_tokens

    def _inputs(self, images, prompts):
        prompts = prompts[:, prompts.any(axis=0)]  # Drop padding columns.
        image_ids = np.full(
            (len(prompts), self.num_image_tokens),
            self.model.config.image_token_index,
        )
        input_ids = torch.tensor(np.concatenate([image_ids, prompts], axis=1))
        return {
            "input_ids": input_ids,
            "pixel_values": torch.tensor(images.transpose(0, 3, 1, 2)),
            "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids),
        }

    def prefill(self, images, prompts):
        with torch.no_grad():
            self.model(**self._inputs(images, prompts),
                       logits_to_keep=prompts.shape[1])

    def generate(self, images, prompts, new_tokens):
        inputs = self._inputs(images, prompts)
        with torch.no_grad():
            out = self.model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        return out[:, inputs["input_ids"].shape[1]:].numpy()


def random_inputs(backbone, batch, length, seed):
    rng = np.random.default_rng(seed)
    size = backbone.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    prompts = rng.integers(3, min(backbone.vocabulary_size, 256000),
                           (batch, length)).astype("int32")
    prompts[:, 0], prompts[:, -1] = 2, NEWLINE
    return images, prompts


def run_batch(runners, backbone, batch, args):
    """Interleaved best-of measurements of every runner for one batch size."""
    images, prompts = random_inputs(backbone, batch, PROMPT_LENGTH, args.seed)
    # A one token shorter prompt, right-padded: shows any recompilation.
    other_images, shorter = random_inputs(
        backbone, batch, PROMPT_LENGTH - 1, args.seed + 1)
    shorter = np.pad(shorter, ((0, 0), (0, 1)))
    compilations = {r.name: r.compilations for r in runners}
    best = {r.name: {"prefill": [], "ttft": [], "generate": []} for r in runners}
    rss, tokens = {}, {}
    for runner in runners:  # Warm up: compile every shape once.
        with PeakRss() as memory:
            runner.prefill(images, prompts)
            runner.generate(other_images, shorter, args.new_tokens)
            runner.generate(images, prompts, 1)
            tokens[runner.name] = runner.generate(images, prompts, args.new_tokens)
        rss[runner.name] = memory
    for _ in range(args.repeats):
        for runner in runners:
            times = best[runner.name]
            times["prefill"].append(seconds(
                lambda: runner.prefill(images, prompts)))
            times["ttft"].append(seconds(
                lambda: runner.generate(images, prompts, 1)))
            times["generate"].append(seconds(
                lambda: runner.generate(images, prompts, args.new_tokens)))
    rows = []
    for runner in runners:
        times = {key: min(values) for key, values in best[runner.name].items()}
        memory = rss[runner.name]
        rows.append({
            "model": runner.name, "batch": batch,
            "prefill_ms": 1e3 * times["prefill"],
            "ttft_ms": 1e3 * times["ttft"],
            "decode_ms_per_token": 1e3 * (times["generate"] - times["ttft"])
            / (args.new_tokens - 1),
            "peak_rss_mb": memory.peak / 2**20,
            "rss_increase_mb": (memory.peak - memory.before) / 2**20,
            "compilations": runner.compilations - compilations[runner.name],
            "tokens_equal_ours": bool(
                np.array_equal(tokens[runner.name], tokens["ours"])),
        })
    return rows


METRICS = [("prefill", "prefill_ms"), ("ttft", "ttft_ms"),
           ("decode", "decode_ms_per_token")]


def ratios(rows, floor_by_batch):
    """us/peer and us/floor for each batch and metric."""
    out = []
    for batch, floor in floor_by_batch.items():
        by_model = {r["model"]: r for r in rows if r["batch"] == batch}
        for metric, key in METRICS:
            ours = by_model["ours"][key]
            entry = {"batch": batch, "metric": metric,
                     "floor_ms": 1e3 * floor[metric],
                     "us_over_floor": ours / (1e3 * floor[metric])}
            for model, row in by_model.items():
                if model != "ours":
                    entry[f"us_over_{model}"] = ours / row[key]
            out.append(entry)
    return out


ROW_COLUMNS = [
    ("model", "model", ""), ("batch", "batch", ""),
    ("prefill ms", "prefill_ms", ".1f"), ("TTFT ms", "ttft_ms", ".1f"),
    ("decode ms/token", "decode_ms_per_token", ".2f"),
    ("peak RSS MB", "peak_rss_mb", ".0f"),
    ("RSS increase MB", "rss_increase_mb", ".0f"),
    ("compilations", "compilations", ""),
    ("tokens = ours", "tokens_equal_ours", ""),
]


def table(entries, columns):
    """A markdown table of dicts; `columns` are `(header, key, format)`."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "---|" * len(columns)]
    for entry in entries:
        cells = [format(entry[key], spec) for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result):
    """The measurements and the ratios as two markdown tables."""
    hardware = result["hardware"]
    peers = [r["model"] for r in result["rows"] if r["model"] != "ours"]
    ratio_columns = [("batch", "batch", ""), ("metric", "metric", ""),
                     ("floor ms", "floor_ms", ".2f"),
                     ("us/floor", "us_over_floor", ".2f")]
    ratio_columns += [(f"us/{p}", f"us_over_{p}", ".2f")
                      for p in dict.fromkeys(peers)]
    return "\n\n".join([
        f"backend {result['backend']}, "
        f"{sum(result['parameters'].values()):,} parameters, bandwidth "
        f"{hardware['bandwidth'] / 1e9:.1f} GB/s, matmul "
        f"{hardware['matmul'] / 1e9:.1f} GFLOP/s",
        table(result["rows"], ROW_COLUMNS),
        table(result["ratios"], ratio_columns),
    ])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="decoder layers")
    parser.add_argument("--vit-layers", type=int, help="SigLIP layers")
    parser.add_argument("--small", action="store_true", help="tiny widths")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default="keras_hub,transformers",
                        help="comma-separated subset of keras_hub,transformers")
    parser.add_argument("--bandwidth-mb", type=int, help="floor array size")
    parser.add_argument("--matmul-size", type=int, help="floor matmul side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    config = dict(SMALL if args.small else PALIGEMMA2_3B_224)
    if args.layers:
        config["num_layers"] = args.layers
    if args.vit_layers:
        config["vit_num_layers"] = args.vit_layers
    backbone = random_backbone(config, args.seed)
    runners = [KerasRunner("ours", PaliGemmaCausalLM(backbone))]
    peers = [p for p in args.peers.split(",") if p]
    if "transformers" in peers:
        runners.append(TransformersRunner(
            transformers_model(backbone), backbone.num_image_tokens))
    if "keras_hub" in peers:
        runners.insert(1, KerasRunner("keras_hub", keras_hub_causal_lm(backbone)))
    hardware = measure_hardware(
        args.bandwidth_mb or (64 if args.small else 1024),
        args.matmul_size or (256 if args.small else 2048),
    )
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for b in batches for row in run_batch(runners, backbone, b, args)]
    ratio_rows = ratios(rows, {b: floors(backbone, b, hardware) for b in batches})
    result = {
        "backend": keras.config.backend(), "config": config,
        "parameters": parameter_counts(backbone), "image_tokens":
        backbone.num_image_tokens, "prompt_tokens": PROMPT_LENGTH,
        "new_tokens": args.new_tokens, "hardware": hardware,
        "rows": rows, "ratios": ratio_rows,
    }
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
