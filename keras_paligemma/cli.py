"""Command line: `keras-paligemma generate --preset P --image I --prompt T`.

The backend is chosen with `--backend` (or `KERAS_BACKEND`), before Keras
is imported.
"""

import argparse
import os
import sys
import time


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-paligemma",
        description="Run PaliGemma on images from the command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate", help="Answer a prompt about one or more images."
    )
    generate.add_argument(
        "--preset",
        required=True,
        help="Preset directory, e.g. presets/pali_gemma_tiny_random.",
    )
    generate.add_argument(
        "--image", required=True, nargs="+", help="Image file path(s)."
    )
    generate.add_argument(
        "--prompt",
        required=True,
        help='Prompt, e.g. "caption en" or "answer en what is this?".',
    )
    generate.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="Packed text length (prompt + answer tokens); defaults to the "
        "preset's sequence length.",
    )
    generate.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        default=None,
        help="Keras backend (default: $KERAS_BACKEND, else jax).",
    )
    return parser


def _check_images(paths):
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --image {path!r}: no such file.")


def generate(args):
    _check_images(args.image)
    if not os.path.isdir(args.preset):
        raise SystemExit(
            f"error: --preset {args.preset!r}: no such preset directory."
        )
    os.environ["KERAS_BACKEND"] = (
        args.backend or os.environ.get("KERAS_BACKEND") or "jax"
    )
    start = time.perf_counter()
    import keras_paligemma

    causal_lm = keras_paligemma.PaliGemmaCausalLM.from_preset(args.preset)
    loaded = time.perf_counter()
    print(
        f"Loaded {args.preset} on {os.environ['KERAS_BACKEND']} in "
        f"{loaded - start:.1f} s.",
        file=sys.stderr,
    )
    for path in args.image:
        began = time.perf_counter()
        try:
            answer = causal_lm.generate(
                {"images": path, "prompts": args.prompt},
                max_length=args.max_length,
                strip_prompt=True,
            )
        except (ValueError, TypeError) as error:
            raise SystemExit(f"error: {path}: {error}")
        seconds = time.perf_counter() - began
        print(f"{path}: {answer!r}")
        print(f"  ({seconds:.2f} s)", file=sys.stderr)


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "generate":
        generate(args)


if __name__ == "__main__":
    main()
