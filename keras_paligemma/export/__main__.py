"""Re-create a preset under the TensorFlow backend and export it.

`export_saved_model` and `export_backbone` run this in a subprocess, after
checking the target directory and saving the model as a preset:

    python -m keras_paligemma.export PRESET OUT [--max-length N]
    python -m keras_paligemma.export PRESET OUT --backbone
"""

import argparse
import os

os.environ["KERAS_BACKEND"] = "tensorflow"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("path")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument(
        "--backbone", action="store_true", help="Export the raw backbone."
    )
    args = parser.parse_args()

    from keras_paligemma import PaliGemmaBackbone
    from keras_paligemma import PaliGemmaCausalLM
    from keras_paligemma.export import saved_model

    if args.backbone:
        backbone = PaliGemmaBackbone.from_preset(args.preset)
        backbone.export(args.path, format="tf_saved_model", verbose=False)
    else:
        causal_lm = PaliGemmaCausalLM.from_preset(args.preset)
        saved_model.write_saved_model(causal_lm, args.path, args.max_length)


if __name__ == "__main__":
    main()
