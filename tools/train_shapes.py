"""Fine-tune a tiny PaliGemma on the synthetic shapes task, then save it.

The flow is the official Keras PaliGemma notebook's: load a preset, lower
`preprocessor.sequence_length`, optionally `backbone.enable_lora(rank)`,
compile with `SparseCategoricalCrossentropy(from_logits=True)` and AdamW,
`fit` a dict of `{"images", "prompts", "responses"}`. Held-out accuracy is
printed before and after; the loss curve can be drawn to a PNG.

The shipped demo preset was made with (about 2 minutes on 2 CPU cores):

    KERAS_BACKEND=jax python tools/train_shapes.py \\
        --output presets/pali_gemma_shapes --plot guides/images/loss_full.png

Add `--lora-rank 4` to train adapters only (`--plot
guides/images/loss_lora.png` for the guide's LoRA curve).
"""

import argparse
import json
import os
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
sys.path.insert(0, REPO)

import keras  # noqa: E402

import shapes_task  # noqa: E402

BASE_PRESET = os.path.join(REPO, "presets", "pali_gemma_tiny_random")
SEQUENCE_LENGTH = 32
ANSWER_LENGTH = 48  # `max_length` for held-out generation
SERVING_SEQUENCE_LENGTH = 64  # saved with the preset: room for any answer


def compile_for_fine_tuning(causal_lm, steps, learning_rate):
    """The notebook's compile, with a warm-up + cosine learning rate."""
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=steps,
        warmup_target=learning_rate,
        warmup_steps=max(steps // 10, 1),
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale", "gamma"])
    causal_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


class BatchLosses(keras.callbacks.Callback):
    """Per-batch losses, recovered from Keras' running epoch mean."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean, self._seen = 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self._seen += 1
        self.losses.append(self._seen * mean - (self._seen - 1) * self._previous_mean)
        self._previous_mean = mean


def evaluate(causal_lm, dataset):
    """Held-out metrics (see `shapes_task.score`) of greedy answers."""
    answers = causal_lm.generate(
        {"images": dataset["images"], "prompts": dataset["prompts"]},
        max_length=ANSWER_LENGTH,
        strip_prompt=True,
    )
    return shapes_task.score(dataset, answers)


def train(
    causal_lm,
    steps=600,
    batch_size=64,
    learning_rate=5e-3,
    seed=0,
    lora_rank=None,
    verbose=0,
):
    """Fine-tune `causal_lm` in place on fresh shapes examples.

    Returns the per-batch training losses. (Seed Keras with
    `keras.utils.set_random_seed` before building the model, if needed:
    seeding after a tokenizer exists breaks TF Text's resources.)
    """
    if lora_rank:
        causal_lm.backbone.enable_lora(lora_rank)
    causal_lm.preprocessor.sequence_length = SEQUENCE_LENGTH
    compile_for_fine_tuning(causal_lm, steps, learning_rate)
    data = shapes_task.make_dataset(
        steps * batch_size, seed=seed + 1, image_size=56
    )
    losses = BatchLosses()
    causal_lm.fit(
        {key: data[key] for key in ("images", "prompts", "responses")},
        batch_size=batch_size,
        epochs=1,
        shuffle=False,
        callbacks=[losses],
        verbose=verbose,
    )
    return losses.losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="preset directory to write")
    parser.add_argument("--base", default=BASE_PRESET, help="preset to start from")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="PNG file for the loss curve")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    from keras_paligemma import PaliGemmaCausalLM
    from keras_paligemma.models.preset_dir import check_preset_dir

    check_preset_dir(args.output, args.overwrite)
    held_out = shapes_task.make_dataset(96, seed=10_000 + args.seed)
    keras.utils.set_random_seed(args.seed)
    causal_lm = PaliGemmaCausalLM.from_preset(args.base)
    print("held-out before:", json.dumps(evaluate(causal_lm, held_out)))
    start = time.time()
    losses = train(
        causal_lm,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        lora_rank=args.lora_rank,
        verbose=2,
    )
    print(f"trained {args.steps} steps in {time.time() - start:.0f} s")
    print("held-out after: ", json.dumps(evaluate(causal_lm, held_out)))
    if args.lora_rank:
        causal_lm.backbone.merge_lora()
    causal_lm.preprocessor.sequence_length = SERVING_SEQUENCE_LENGTH
    causal_lm.save_to_preset(args.output, overwrite=args.overwrite)
    print(f"saved {args.output}")
    if args.plot:
        from plot_loss import save_loss_plot

        title = f"shapes, {'LoRA rank %d' % args.lora_rank if args.lora_rank else 'full fine-tuning'}"
        save_loss_plot(losses, args.plot, title=title)
        print(f"saved {args.plot}")


if __name__ == "__main__":
    main()
