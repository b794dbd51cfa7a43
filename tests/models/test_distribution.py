"""Model parallelism: the layout map, and the tiny model split on 8 devices.

`keras.distribution.ModelParallel` only runs on JAX in Keras 3, and JAX
fixes its device count when it starts; so the sharded checks run this file
as a script (`python test_distribution.py OUT_DIR`) in a fresh JAX process
with 8 host CPU devices. That process runs the same preset twice, on one
device and split over a (batch=4, model=2) mesh, and saves what both did.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import BACKEND, REPO, TINY_PRESET
from keras_paligemma import PaliGemmaBackbone, PaliGemmaCausalLM
from keras_paligemma.models.layout_map import backbone_layout_map

# The tiny preset's SigLIP has 2 heads, so its model axis can be 2 at most.
MESH_SHAPE = {"batch": 4, "model": 2}
JAX_ONLY = pytest.mark.skipif(
    BACKEND != "jax",
    reason="keras.distribution.ModelParallel runs on JAX only in Keras 3 "
    "(TensorFlow's distribution_lib is an unused prototype, torch has none)",
)
SPLIT = {
    "token_embedding/embeddings": ("model", "batch"),
    "decoder_block_1/attention/query/kernel": ("model", None, "batch"),
    "decoder_block_1/attention/key/kernel": (None, None, "model"),
    "decoder_block_1/attention/value/kernel": (None, None, "model"),
    "decoder_block_1/attention/attention_output/kernel": (
        "batch", "model", None
    ),
    "decoder_block_1/gate/kernel": ("model", "batch"),
    "decoder_block_1/up/kernel": ("model", "batch"),
    "decoder_block_1/down/kernel": ("batch", "model"),
    "vision_encoder/block_1/query/kernel": ("batch", "model", None),
    "vision_encoder/block_1/value/kernel": ("batch", "model", None),
    "vision_encoder/block_1/attention_output/kernel": ("model", None, "batch"),
    "vision_encoder/block_1/mlp_in/kernel": ("batch", "model"),
    "vision_encoder/block_1/mlp_out/kernel": ("model", "batch"),
    "vision_encoder/projector/kernel": ("batch", "model"),
}
REPLICATED = (
    "position_embedding", "patch_embedding", "bias", "gamma", "beta", "scale",
    "lora_kernel_a", "lora_kernel_b",
)


def replicated(path):
    return any(part in REPLICATED for part in path.split("/")[-2:])


def mesh(axis_names=("batch", "model")):
    return keras.distribution.DeviceMesh(
        shape=(1, 1), axis_names=axis_names, devices=["cpu:0"]
    )


def test_every_kernel_has_a_layout_of_its_rank_and_small_weights_none():
    """Kernels get layouts; norms, biases and LoRA adapters replicate."""
    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET)
    backbone.enable_lora(2)
    layout_map = PaliGemmaBackbone.get_layout_map(mesh())
    for variable in backbone.weights:
        layout = layout_map[variable.path]
        if replicated(variable.path):
            assert layout is None, variable.path
        else:
            assert len(layout.axes) == len(variable.shape), variable.path
            assert "model" in layout.axes, variable.path
    for path, axes in SPLIT.items():
        assert layout_map[path].axes == axes


def test_renamed_axes_are_used():
    layout_map = backbone_layout_map(
        mesh(("data", "tensor")),
        model_parallel_dim_name="tensor",
        data_parallel_dim_name="data",
    )
    assert layout_map["decoder_block_0/gate/kernel"].axes == ("tensor", "data")


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(device_mesh="cpu:0"), "`device_mesh` must be"),
        (
            dict(device_mesh=mesh(("batch", "seq"))),
            r"`model_parallel_dim_name='model'` is not an axis.*'seq'",
        ),
        (
            dict(device_mesh=mesh(("data", "model"))),
            "`data_parallel_dim_name='batch'` is not an axis",
        ),
        (
            dict(
                device_mesh=mesh(),
                model_parallel_dim_name="model",
                data_parallel_dim_name="model",
            ),
            "must name different mesh axes",
        ),
    ],
)
def test_bad_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        backbone_layout_map(**args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run this file in an 8-device JAX process; load what it saved."""
    out = tmp_path_factory.mktemp("distribution")
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]),
    )
    done = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    return {
        name: (
            dict(np.load(out / f"{name}.npz")),
            json.loads((out / f"{name}.json").read_text()),
        )
        for name in ("single", "sharded")
    }


@JAX_ONLY
def test_kernels_are_split_over_the_mesh(runs):
    _, layouts = runs["sharded"]
    for path, axes in SPLIT.items():
        layout = layouts["after_load"][path]
        assert tuple(layout["spec"]) == axes, path
        expected = [
            size // (MESH_SHAPE[axis] if axis else 1)
            for size, axis in zip(layout["shape"], axes)
        ]
        assert layout["shard_shape"] == expected, path
        assert layout["devices"] == 8
    # E.g. the (1472, 64) embedding: (736, 16) on each device.
    embedding = layouts["after_load"]["token_embedding/embeddings"]
    assert embedding["shard_shape"] == [736, 16]
    for path, layout in layouts["after_load"].items():
        split = layout["shard_shape"] != layout["shape"]
        assert split == (not replicated(path)), path
    assert layouts["after_fit"] == layouts["after_load"]


@JAX_ONLY
def test_unsharded_run_holds_whole_weights_on_one_device(runs):
    _, layouts = runs["single"]
    for path, layout in layouts["after_load"].items():
        assert layout["shard_shape"] == layout["shape"], path
        assert layout["devices"] == 1


@JAX_ONLY
def test_sharded_forward_and_generate_match(runs):
    single, _ = runs["single"]
    sharded, _ = runs["sharded"]
    np.testing.assert_allclose(
        sharded["logits"], single["logits"], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(sharded["generated"], single["generated"])
    prompt_lengths = single["prompt_mask"].sum(axis=1)
    assert (single["generated_mask"].sum(axis=1) > prompt_lengths).all()


@JAX_ONLY
def test_sharded_fit_matches(runs):
    single, layouts = runs["single"]
    sharded, _ = runs["sharded"]
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5)
    assert single["losses"][1] < single["losses"][0]
    unchanged = []
    for i, path in enumerate(layouts["after_load"]):
        after = single[f"weight_{i}"]
        np.testing.assert_allclose(
            sharded[f"weight_{i}"], after, rtol=1e-4, atol=1e-6, err_msg=path
        )
        if np.allclose(after, single[f"initial_weight_{i}"]):
            unchanged.append(path)
    # Key biases shift every score of a query equally: no gradient.
    assert unchanged == [
        "vision_encoder/block_0/key/bias",
        "vision_encoder/block_1/key/bias",
    ]


def describe_layouts(causal_lm):
    """Each backbone weight's shape, mesh axes, shard shape and devices."""
    layouts = {}
    for variable in causal_lm.backbone.weights:
        sharding = variable.value.sharding
        spec = list(getattr(sharding, "spec", []))
        layouts[variable.path] = {
            "shape": list(variable.shape),
            "spec": spec + [None] * (len(variable.shape) - len(spec)),
            "shard_shape": list(
                variable.value.addressable_shards[0].data.shape
            ),
            "devices": len(sharding.device_set),
        }
    return layouts


def run_once(name, distribution, out_dir):
    """Load, predict, generate and fit the tiny preset; save the results."""
    keras.distribution.set_distribution(distribution)
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    layouts = {"after_load": describe_layouts(causal_lm)}
    weights = causal_lm.backbone.weights
    initial = [keras.ops.convert_to_numpy(v) for v in weights]
    rng = np.random.default_rng(0)
    images = list(rng.integers(0, 256, (4, 40, 40, 3), dtype="uint8"))
    prompts = ["caption en", "ocr", "answer en what is it?", "detect cat"]
    preprocessor = causal_lm.preprocessor
    x = preprocessor.generate_preprocess(
        {"images": images, "prompts": prompts}, sequence_length=24
    )
    x = {key: keras.ops.convert_to_numpy(value) for key, value in x.items()}
    response_mask = np.zeros_like(x["padding_mask"])
    response_mask[:, 6:] = x["padding_mask"][:, 6:]
    logits = causal_lm({**x, "response_mask": response_mask})
    causal_lm.preprocessor = None
    generated = causal_lm.generate(x, stop_token_ids=None)
    causal_lm.preprocessor = preprocessor
    causal_lm.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5))
    history = causal_lm.fit(
        {
            "images": images,
            "prompts": prompts,
            "responses": ["a cat", "hello", "yes", "<loc0001> cat"],
        },
        batch_size=4,
        epochs=2,
        shuffle=False,
        verbose=0,
    )
    layouts["after_fit"] = describe_layouts(causal_lm)
    arrays = {
        "logits": keras.ops.convert_to_numpy(logits),
        "prompt_mask": x["padding_mask"],
        "generated": keras.ops.convert_to_numpy(generated["token_ids"]),
        "generated_mask": keras.ops.convert_to_numpy(
            generated["padding_mask"]
        ),
        "losses": np.array(history.history["loss"]),
    }
    for i, variable in enumerate(weights):
        arrays[f"weight_{i}"] = keras.ops.convert_to_numpy(variable)
        arrays[f"initial_weight_{i}"] = initial[i]
    np.savez(os.path.join(out_dir, f"{name}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as file:
        json.dump(layouts, file)


def main(out_dir):
    assert keras.distribution.get_device_count() == 8
    run_once("single", None, out_dir)
    device_mesh = keras.distribution.DeviceMesh(
        shape=tuple(MESH_SHAPE.values()),
        axis_names=tuple(MESH_SHAPE),
        devices=keras.distribution.list_devices(),
    )
    distribution = keras.distribution.ModelParallel(
        layout_map=PaliGemmaBackbone.get_layout_map(device_mesh),
        batch_dim_name="batch",
    )
    run_once("sharded", distribution, out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
