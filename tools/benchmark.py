"""Benchmark PaliGemma generation against keras-hub, transformers and the floor.

Builds our `PaliGemmaCausalLM` with random float32 weights (PaliGemma 2
3B-224 widths by default; `--layers` / `--vit-layers` shrink the depth),
copies the same weights into keras-hub's `PaliGemmaCausalLM` (same Keras
backend) and transformers' `PaliGemmaForConditionalGeneration` (torch),
then measures, for each batch size, with 256 image + 12 prompt tokens and
greedy decoding without stop tokens:

- prefill: one forward pass over image + prompt (logits of the prompt);
- TTFT: `generate` of one new token (image encoding, prefill, one token);
- decode: `(time of N new tokens - time of their first) / (N - 1)`, ms
  per token. The first token is timed with room for N (a Keras `generate`
  stopped by a stop token after it: Keras models prefill the text buffer,
  ours up to its prompt bucket), so both timings prefill the same width;
  from `generate` of one token, the extra prefill columns of the longer
  buffer counted as decode (on B0, up to 8 ms/token at batch 1, 14-62 at
  batch 8 in the runs of 2026-12-06);
- peak RSS while the model generates, and its increase over the start;
- compilations: traces of `generate_step` (0 where it runs eagerly),
  a one token shorter prompt included;
- token agreement with our float32 model and the largest prefill logit
  difference from it (`--variants int8,bfloat16` adds our quantized and
  bfloat16 models, built from the same weights);
- several questions about one image (`--questions N`): N prompts sharing
  one image (encoded once) against the image repeated N times.

Models run interleaved (A B C A B C ...); each time is the best of
`--repeats`. The same run measures memory bandwidth and matmul throughput
before the runs and before each repeat, interleaved with the models, and
takes the median for floors: decode = weight bytes per step / bandwidth, prefill and TTFT
= matmul FLOPs / throughput (each or the other bound if larger; TTFT
counts the work one answer token needs, see `benchmark_measure.floors`).
The bandwidth of this shared machine switches during a run, so decode is
also set against a paired floor: the read rate measured just before and
after each model's decode timings (`benchmark_report.paired_floor_ratio`).
Prints markdown
tables; `--json` writes everything.

    KERAS_BACKEND=jax python tools/benchmark.py --layers 4 --vit-layers 4
    python tools/benchmark.py --small  # tiny widths: a smoke test
"""

import argparse
import json
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark_measure import PeakRss  # noqa: E402
from benchmark_measure import floors  # noqa: E402
from benchmark_measure import measure_hardware  # noqa: E402
from benchmark_measure import median_hardware  # noqa: E402
from benchmark_measure import parameter_counts  # noqa: E402
from benchmark_measure import read_rates  # noqa: E402
from benchmark_measure import seconds  # noqa: E402
from benchmark_peers import KerasRunner  # noqa: E402
from benchmark_peers import TransformersRunner  # noqa: E402
from benchmark_peers import keras_hub_causal_lm  # noqa: E402
from benchmark_peers import random_backbone  # noqa: E402
from benchmark_peers import transformers_model  # noqa: E402
from benchmark_peers import variant_causal_lm  # noqa: E402
from benchmark_report import markdown  # noqa: E402
from benchmark_report import paired_floor_ratio  # noqa: E402
from benchmark_report import ratios  # noqa: E402

from keras_paligemma import PaliGemmaCausalLM  # noqa: E402

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


def random_inputs(backbone, batch, length, seed):
    rng = np.random.default_rng(seed)
    size = backbone.image_size
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    prompts = rng.integers(3, min(backbone.vocabulary_size, 256000),
                           (batch, length)).astype("int32")
    prompts[:, 0], prompts[:, -1] = 2, NEWLINE
    return images, prompts


def run_batch(runners, backbone, batch, args, before_repeat=None, probe=None):
    """Interleaved best-of measurements of every runner for one batch size;
    `before_repeat()`, if given, runs before each repeat. `probe()`, if
    given, returns the memory read rate now: it runs just before and just
    after each runner's decode timings, and the row keeps each repeat's
    decode time (its generate time less the best time to the first of its
    tokens, `first_token`) with the faster of the two rates
    (`decode_samples`)."""
    images, prompts = random_inputs(backbone, batch, PROMPT_LENGTH, args.seed)
    # A one token shorter prompt, right-padded: shows any recompilation.
    other_images, shorter = random_inputs(
        backbone, batch, PROMPT_LENGTH - 1, args.seed + 1)
    shorter = np.pad(shorter, ((0, 0), (0, 1)))
    compilations = {r.name: r.compilations for r in runners}
    best = {r.name: {key: [] for key in (
        "prefill", "ttft", "first", "generate", "bandwidth")} for r in runners}
    rss, tokens, logits, stop_traces = {}, {}, {}, {}
    for runner in runners:  # Warm up: compile every shape once.
        with PeakRss() as memory:
            logits[runner.name] = runner.prefill(images, prompts)
            runner.generate(other_images, shorter, args.new_tokens)
            runner.generate(images, prompts, 1)
            tokens[runner.name] = runner.generate(images, prompts, args.new_tokens)
        rss[runner.name] = memory
        # The stop-token `generate` is a compilation of the benchmark's own,
        # not counted among the model's.
        traces = runner.compilations
        runner.first_token(
            images, prompts, args.new_tokens, tokens[runner.name][:, 0])
        stop_traces[runner.name] = runner.compilations - traces
    for _ in range(args.repeats):
        if before_repeat:
            before_repeat()
        for runner in runners:
            times = best[runner.name]
            times["prefill"].append(seconds(
                lambda: runner.prefill(images, prompts)))
            before = probe() if probe else None
            times["ttft"].append(seconds(
                lambda: runner.generate(images, prompts, 1)))
            times["first"].append(seconds(lambda: runner.first_token(
                images, prompts, args.new_tokens, tokens[runner.name][:, 0])))
            times["generate"].append(seconds(
                lambda: runner.generate(images, prompts, args.new_tokens)))
            if probe:
                times["bandwidth"].append(max(before, probe()))
    rows = []
    for runner in runners:
        repeats = best[runner.name]
        # Each repeat's N-token generate less the best time to its first
        # token: a repeat's own first-token time (a prefill: seconds, at
        # full depth) varied by more than the N - 1 steps took, which made
        # per-repeat differences meaningless, even negative.
        decodes = [1e3 * (g - min(repeats["first"])) / (args.new_tokens - 1)
                   for g in repeats["generate"]]
        times = {key: min(repeats[key])
                 for key in ("prefill", "ttft", "first", "generate")}
        memory = rss[runner.name]
        rows.append({
            "model": runner.name, "batch": batch,
            "prefill_ms": 1e3 * times["prefill"],
            "ttft_ms": 1e3 * times["ttft"],
            "first_of_new_tokens_ms": 1e3 * times["first"],
            "decode_ms_per_token": 1e3 * (times["generate"] - times["first"])
            / (args.new_tokens - 1),
            "decode_samples": [list(pair) for pair in
                               zip(decodes, repeats["bandwidth"])],
            "peak_rss_mb": memory.peak / 2**20,
            "rss_increase_mb": (memory.peak - memory.before) / 2**20,
            "compilations": runner.compilations - compilations[runner.name]
            - stop_traces[runner.name],
            "tokens_equal_ours": bool(
                np.array_equal(tokens[runner.name], tokens["ours"])),
            "token_agreement": float(
                np.mean(tokens[runner.name] == tokens["ours"])),
            "max_logit_drift": None if logits[runner.name] is None else float(
                np.max(np.abs(logits[runner.name] - logits["ours"]))),
        })
    return rows


def run_questions(runner, backbone, count, args):
    """`count` prompts about one image: shared image vs repeated image.

    Both give the same tokens; sharing encodes the image once instead of
    `count` times (the decoder still prefills every prompt: PaliGemma's
    image tokens attend to the prompt, so their cache is per prompt).
    """
    images, prompts = random_inputs(backbone, count, PROMPT_LENGTH, args.seed)
    ways = {"shared": images[:1], "repeated": np.repeat(images[:1], count, 0)}
    tokens = {way: runner.generate(pixels, prompts, args.new_tokens)
              for way, pixels in ways.items()}
    for pixels in ways.values():
        runner.generate(pixels, prompts, 1)
    times = {f"{way}_{what}": [] for way in ways for what in ("ttft", "generate")}
    for _ in range(args.repeats):
        for way, pixels in ways.items():
            times[f"{way}_ttft"].append(seconds(
                lambda: runner.generate(pixels, prompts, 1)))
            times[f"{way}_generate"].append(seconds(
                lambda: runner.generate(pixels, prompts, args.new_tokens)))
    row = {"questions": count, "new_tokens": args.new_tokens,
           "tokens_equal": bool(np.array_equal(*tokens.values()))}
    row.update({f"{key}_ms": 1e3 * min(values) for key, values in times.items()})
    row["ttft_saving"] = 1 - row["shared_ttft_ms"] / row["repeated_ttft_ms"]
    row["generate_saving"] = (
        1 - row["shared_generate_ms"] / row["repeated_generate_ms"])
    return row


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
    parser.add_argument("--variants", default="",
                        help="also ours in: comma-separated int8,bfloat16")
    parser.add_argument("--questions", type=int, default=4,
                        help="prompts about one image (0 to skip)")
    parser.add_argument("--bandwidth-mb", type=int, help="floor array size")
    parser.add_argument("--matmul-size", type=int, help="floor matmul side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - {"int8", "bfloat16"}
    if unknown:
        parser.error(f"--variants takes int8 and bfloat16; got {sorted(unknown)}")
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
    for variant in args.variants:
        runners.append(KerasRunner(
            f"ours-{variant}", variant_causal_lm(backbone, variant)))
    peers = [p for p in args.peers.split(",") if p]
    if "transformers" in peers:
        runners.append(TransformersRunner(
            transformers_model(backbone), backbone.num_image_tokens))
    if "keras_hub" in peers:
        runners.insert(1 + len(args.variants),
                       KerasRunner("keras_hub", keras_hub_causal_lm(backbone)))
    samples = []
    bandwidth_mb = args.bandwidth_mb or (64 if args.small else 1024)

    def measure():
        samples.append(measure_hardware(
            bandwidth_mb, args.matmul_size or (256 if args.small else 2048)))

    def probe():
        return read_rates(bandwidth_mb, repeats=2)["bandwidth"]

    measure()
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for b in batches
            for row in run_batch(runners, backbone, b, args, measure, probe)]
    hardware = median_hardware(samples)
    for row in rows:  # The floors count float32 weights: not variants'.
        row["decode_over_paired_floor"] = None if row["model"] in (
            f"ours-{variant}" for variant in args.variants
        ) else paired_floor_ratio(
            row["decode_samples"], lambda rate, batch=row["batch"]: floors(
                backbone, batch, dict(hardware, bandwidth=rate), PROMPT_LENGTH
            )["decode"])
    ratio_rows = ratios(rows, {
        b: floors(backbone, b, hardware, PROMPT_LENGTH) for b in batches})
    questions = []
    if args.questions:
        questions.append(run_questions(runners[0], backbone, args.questions, args))
    result = {
        "backend": keras.config.backend(), "config": config,
        "parameters": parameter_counts(backbone), "image_tokens":
        backbone.num_image_tokens, "prompt_tokens": PROMPT_LENGTH,
        "new_tokens": args.new_tokens, "hardware": hardware,
        "rows": rows, "ratios": ratio_rows, "questions": questions,
    }
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
