"""Command line: `keras-paligemma {generate,detect,segment} ...`.

    keras-paligemma generate --preset DIR --image a.png --prompt "caption en"
    keras-paligemma detect --preset DIR --image a.png --objects cat dog \\
        --output annotated.png
    keras-paligemma segment --preset DIR --image a.png --object cat \\
        --vae vae-oid.npz --output annotated.png

The backend is chosen with `--backend` (or `KERAS_BACKEND`), before Keras
is imported. With several images, `--output` names a directory.
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
        "--prompt",
        required=True,
        help='Prompt, e.g. "caption en" or "answer en what is this?".',
    )
    detect = commands.add_parser("detect", help="Detect objects, draw boxes.")
    detect.add_argument(
        "--objects", required=True, nargs="+", help="Object names to find."
    )
    segment = commands.add_parser("segment", help="Segment an object.")
    segment.add_argument("--object", required=True, help="Object name.")
    segment.add_argument(
        "--vae",
        default=None,
        help="big_vision vae-oid.npz, to turn codes into masks (else boxes "
        "only).",
    )
    for command in (generate, detect, segment):
        command.add_argument(
            "--preset", required=True, help="Preset directory."
        )
        command.add_argument(
            "--image", required=True, nargs="+", help="Image file path(s)."
        )
        command.add_argument(
            "--max-length",
            type=int,
            default=None,
            help="Packed text length (prompt + answer tokens); defaults to "
            "the preset's sequence length.",
        )
        command.add_argument(
            "--backend",
            choices=("jax", "tensorflow", "torch"),
            default=None,
            help="Keras backend (default: $KERAS_BACKEND, else jax).",
        )
    for command in (detect, segment):
        command.add_argument(
            "--output",
            default=None,
            help="Annotated PNG to write (a directory for several images).",
        )
    return parser


def _check_paths(args):
    for path in args.image:
        if not os.path.isfile(path):
            raise SystemExit(f"error: --image {path!r}: no such file.")
    if not os.path.isdir(args.preset):
        raise SystemExit(
            f"error: --preset {args.preset!r}: no such preset directory."
        )
    vae = getattr(args, "vae", None)
    if vae is not None and not os.path.isfile(vae):
        raise SystemExit(f"error: --vae {vae!r}: no such file.")


def _output_paths(args):
    if getattr(args, "output", None) is None:
        return [None] * len(args.image)
    if len(args.image) == 1:
        return [args.output]
    os.makedirs(args.output, exist_ok=True)
    stems = [os.path.splitext(os.path.basename(p))[0] for p in args.image]
    return [os.path.join(args.output, f"{s}_annotated.png") for s in stems]


def _run(args):
    import keras_paligemma as kp

    start = time.perf_counter()
    causal_lm = kp.PaliGemmaCausalLM.from_preset(args.preset)
    print(
        f"Loaded {args.preset} on {os.environ['KERAS_BACKEND']} in "
        f"{time.perf_counter() - start:.1f} s.",
        file=sys.stderr,
    )
    decoder = None
    if getattr(args, "vae", None):
        decoder = kp.MaskDecoder.from_vae_checkpoint(args.vae)
    outputs = _output_paths(args)
    for done, (path, output) in enumerate(zip(args.image, outputs), 1):
        began = time.perf_counter()
        try:
            if args.command == "generate":
                result = causal_lm.generate(
                    {"images": path, "prompts": args.prompt},
                    max_length=args.max_length,
                    strip_prompt=True,
                )
                print(f"{path}: {result!r}")
            else:
                if args.command == "detect":
                    results = causal_lm.detect(
                        path, args.objects, max_length=args.max_length
                    )
                else:
                    results = causal_lm.segment(
                        path, args.object, decoder, max_length=args.max_length
                    )
                for result in results:
                    box = ", ".join(f"{v:.1f}" for v in result.box)
                    print(f"{path}: {result.label!r} at ({box})")
                if not results:
                    print(f"{path}: nothing found")
                if output is not None:
                    kp.draw_results(path, results, output)
                    print(f"  wrote {output}", file=sys.stderr)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"error: {path}: {error}")
        print(
            f"  [{done}/{len(args.image)}] {time.perf_counter() - began:.2f} s",
            file=sys.stderr,
        )


def main(argv=None):
    args = _parser().parse_args(argv)
    _check_paths(args)
    os.environ["KERAS_BACKEND"] = (
        args.backend or os.environ.get("KERAS_BACKEND") or "jax"
    )
    _run(args)


if __name__ == "__main__":
    main()
