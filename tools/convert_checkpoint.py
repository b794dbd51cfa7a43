"""Convert PaliGemma checkpoints between formats.

    # transformers checkpoint directory or keras-hub preset -> our preset
    python tools/convert_checkpoint.py --from hf path/to/hf_dir --to my_preset
    python tools/convert_checkpoint.py --from keras_hub path/to/kaggle_preset --to my_preset
    python tools/convert_checkpoint.py --from big_vision paligemma.npz --to my_preset
    # our preset -> transformers layout (config.json + model.safetensors)
    python tools/convert_checkpoint.py --from ours my_preset --to hf_dir --to-format hf

The target directory must be missing or empty unless --overwrite is given.
Sources are read one tensor at a time and our presets are written one
block at a time (`keras_paligemma.checkpoints.weights_file.save_preset`),
so the peak memory stays near one float32 copy of the model. Prints the
time taken and the peak resident memory of the process.
"""

import argparse
import os
import resource
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="source_format", required=True,
        choices=("hf", "keras_hub", "big_vision", "ours"),
    )
    parser.add_argument("source", help="Source directory (a .npz for big_vision).")
    parser.add_argument("--to", required=True, help="Target directory.")
    parser.add_argument(
        "--to-format", choices=("ours", "hf"), default="ours",
        help="Write our preset format (default) or the transformers layout.",
    )
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.exists(args.source):
        raise SystemExit(f"error: {args.source!r}: no such file or directory.")

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma import PaliGemmaCausalLM
    from keras_paligemma.checkpoints import keras_hub as keras_hub_checkpoint
    from keras_paligemma.checkpoints import transformers as transformers_checkpoint
    from keras_paligemma.checkpoints.transformers_export import export_transformers
    from keras_paligemma.checkpoints.weights_file import save_preset
    from keras_paligemma.models.preset_dir import check_preset_dir

    try:
        check_preset_dir(args.to, args.overwrite)
    except FileExistsError as error:
        raise SystemExit(f"error: {error}")
    start = time.perf_counter()
    print(f"Reading {args.source} ({args.source_format}) ...", file=sys.stderr)
    if args.source_format == "hf":
        has_tokenizer = os.path.isfile(os.path.join(args.source, "tokenizer.model"))
        if args.to_format == "ours" and has_tokenizer:
            model = transformers_checkpoint.load_causal_lm(args.source)
        else:
            model = transformers_checkpoint.load_backbone(args.source)
    elif args.source_format == "big_vision":
        from keras_paligemma.checkpoints import big_vision

        model = big_vision.load_backbone(args.source)
    elif args.source_format == "keras_hub":
        model = keras_hub_checkpoint.load_causal_lm(args.source)
    else:
        try:
            model = PaliGemmaCausalLM.from_preset(args.source)
        except (ValueError, FileNotFoundError):
            model = PaliGemmaBackbone.from_preset(args.source)
    print(
        f"Read in {time.perf_counter() - start:.1f} s; peak RSS so far "
        f"{_peak_rss_mib():.0f} MiB. Writing {args.to} ({args.to_format}) ...",
        file=sys.stderr,
    )
    if args.to_format == "hf":
        backbone = getattr(model, "backbone", model)
        export_transformers(backbone, args.to, overwrite=args.overwrite)
    else:
        save_preset(model, args.to, overwrite=args.overwrite)
    print(
        f"Done in {time.perf_counter() - start:.1f} s; "
        f"peak RSS {_peak_rss_mib():.0f} MiB.",
        file=sys.stderr,
    )


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
