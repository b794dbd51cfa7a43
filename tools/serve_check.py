"""Run an exported PaliGemma SavedModel the way a server would.

Only TensorFlow and TensorFlow Text are imported: `keras_paligemma` and
`keras_hub` are blocked from importing, so nothing of ours can run. (TF
2.16+ itself imports the `keras` package on `import tensorflow`; no Keras
model code is called.) The SavedModel is loaded with
`tf.saved_model.load` and its `serving_default` signature is called on
image files and prompts. The result is printed as JSON: `text` and
`token_ids`.

    python tools/serve_check.py EXPORT_DIR --image a.jpg b.png \\
        --prompt "caption en" "ocr"
"""

import argparse
import json
import sys

BLOCKED = ("keras_paligemma", "keras_hub")


class _BlockImports:
    """A meta-path finder that refuses to import our packages."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in serve_check")
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model")
    parser.add_argument("--image", nargs="+", required=True)
    parser.add_argument("--prompt", nargs="+", required=True)
    args = parser.parse_args()
    if len(args.prompt) not in (1, len(args.image)):
        raise SystemExit(
            "error: give one --prompt, or one per --image "
            f"({len(args.image)} images, {len(args.prompt)} prompts)."
        )
    prompts = args.prompt * (len(args.image) // len(args.prompt))

    sys.meta_path.insert(0, _BlockImports())
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the SentencePiece ops)

    images = []
    for path in args.image:
        with open(path, "rb") as f:
            images.append(f.read())
    serve = tf.saved_model.load(args.saved_model).signatures["serving_default"]
    out = serve(images=tf.constant(images), prompts=tf.constant(prompts))
    print(
        json.dumps(
            {
                "text": [t.decode("utf-8") for t in out["text"].numpy()],
                "token_ids": out["token_ids"].numpy().tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()
