"""LoRA, freezing, mixed precision and the official notebook's fit flow."""

import functools
import os

import keras
import numpy as np
import pytest
from keras import ops

from conftest import BACKEND
from conftest import TINY_PRESET
from keras_paligemma import PaliGemmaBackbone
from keras_paligemma import PaliGemmaCausalLM


def batch(size=4, seed=0):
    """Raw training examples of mixed image sizes."""
    rng = np.random.default_rng(seed)
    images = [
        rng.integers(0, 256, (40 + 8 * i, 56 + 4 * i, 3), dtype="uint8")
        for i in range(size)
    ]
    prompts = ["caption en", "answer en what color is the square?"] * (size // 2)
    responses = ["a red circle", "blue"] * (size // 2)
    return {"images": images, "prompts": prompts, "responses": responses}


def notebook_compile(causal_lm, learning_rate=5e-3):
    """The official Keras PaliGemma notebook's compile call."""
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )


def snapshot(model):
    return {v.path: ops.convert_to_numpy(v).copy() for v in model.weights}


def preprocessed(causal_lm, data):
    x, _, _ = causal_lm.preprocessor(
        {key: data[key] for key in ("images", "prompts", "responses")}
    )
    return x


def logits_of(causal_lm, x):
    return ops.convert_to_numpy(causal_lm(x))


@pytest.fixture
def causal_lm():
    keras.utils.set_random_seed(0)
    return PaliGemmaCausalLM.from_preset(TINY_PRESET)


def test_notebook_flow_trains_only_lora_weights(causal_lm):
    import tensorflow as tf

    causal_lm.backbone.enable_lora(4)
    causal_lm.preprocessor.sequence_length = 24
    notebook_compile(causal_lm)
    data = batch()
    dataset = tf.data.Dataset.from_tensor_slices(
        {
            "images": np.stack([np.resize(im, (48, 48, 3)) for im in data["images"]]),
            "prompts": data["prompts"],
            "responses": data["responses"],
        }
    ).batch(2)
    before = snapshot(causal_lm)
    history = causal_lm.fit(dataset, epochs=8, verbose=0)
    after = snapshot(causal_lm)

    losses = history.history["loss"]
    assert losses[-1] < losses[0]
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    lora_paths = {path for path in before if "lora_kernel" in path}
    # Only adapters on the decoder's q, k, v and output projections train.
    assert changed and changed <= lora_paths
    assert len(lora_paths) == 2 * 4 * causal_lm.backbone.num_layers
    assert all("decoder_block" in path for path in lora_paths)
    assert {v.path for v in causal_lm.trainable_weights} == lora_paths


def test_lora_targets_and_argument_errors():
    backbone = PaliGemmaBackbone.from_preset(TINY_PRESET)
    backbone.enable_lora(2, targets=["ffw", "vision", "decoder_block_0/attention/query"])
    layers = [layer.path for layer in backbone.lora_layers()]
    assert "decoder_block_0/attention/query" in layers
    assert "decoder_block_1/attention/query" not in layers
    assert "decoder_block_1/gate" in layers and "vision_encoder/block_0/mlp_in" in layers
    # Vision biases stay frozen: only adapters train.
    assert {v.name for v in backbone.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}
    with pytest.raises(ValueError, match="already enabled"):
        backbone.enable_lora(2)

    fresh = PaliGemmaBackbone.from_preset(TINY_PRESET)
    with pytest.raises(ValueError, match="Unknown LoRA targets.*'mlp'"):
        fresh.enable_lora(2, targets=["attention", "mlp"])
    with pytest.raises(TypeError, match="`targets` must be a non-empty list"):
        fresh.enable_lora(2, targets="attention")
    with pytest.raises(ValueError, match="`rank` must be a positive int"):
        fresh.enable_lora(0)
    with pytest.raises(ValueError, match="needs `enable_lora"):
        fresh.merge_lora()


def trained_lora(causal_lm, targets=None):
    causal_lm.backbone.enable_lora(4, targets=targets)
    causal_lm.preprocessor.sequence_length = 24
    notebook_compile(causal_lm)
    causal_lm.fit(batch(), batch_size=2, epochs=3, verbose=0)
    return causal_lm


def test_lora_preset_round_trip_and_merge(causal_lm, tmp_path):
    trained_lora(causal_lm, targets=["attention", "ffw"])
    x = preprocessed(causal_lm, batch(2, seed=1))
    expected = logits_of(causal_lm, x)
    prompt = {"images": np.zeros((56, 56, 3), "uint8"), "prompts": "caption en"}
    expected_text = causal_lm.generate(prompt, max_length=20)
    assert prompt["prompts"] == "caption en"  # the caller's dict is untouched

    causal_lm.save_to_preset(tmp_path / "lora")
    assert os.path.exists(tmp_path / "lora" / "lora_adapters.lora.h5")
    loaded = PaliGemmaCausalLM.from_preset(str(tmp_path / "lora"))
    assert loaded.backbone.lora_config == causal_lm.backbone.lora_config
    np.testing.assert_allclose(logits_of(loaded, x), expected, atol=1e-6)
    assert loaded.generate(prompt, max_length=20) == expected_text
    assert {v.name for v in loaded.trainable_weights} == {"lora_kernel_a", "lora_kernel_b"}

    loaded.backbone.merge_lora()
    assert not any("lora" in v.path for v in loaded.weights)
    assert len(loaded.trainable_weights) == len(loaded.weights)
    np.testing.assert_allclose(logits_of(loaded, x), expected, atol=1e-5)
    assert loaded.generate(prompt, max_length=20) == expected_text
    loaded.save_to_preset(tmp_path / "merged")
    assert not os.path.exists(tmp_path / "merged" / "lora_adapters.lora.h5")
    plain = PaliGemmaCausalLM.from_preset(str(tmp_path / "merged"))
    assert not plain.backbone.lora_enabled
    np.testing.assert_allclose(logits_of(plain, x), expected, atol=1e-5)


def test_lora_weights_file_round_trip(causal_lm, tmp_path):
    trained_lora(causal_lm)
    path = str(tmp_path / "adapters.lora.h5")
    causal_lm.backbone.save_lora_weights(path)
    x = preprocessed(causal_lm, batch(2, seed=1))

    fresh = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    fresh.backbone.load_lora_weights(path)
    np.testing.assert_allclose(logits_of(fresh, x), logits_of(causal_lm, x), atol=1e-6)

    other_rank = PaliGemmaBackbone.from_preset(TINY_PRESET)
    other_rank.enable_lora(2)
    with pytest.raises(ValueError, match="both must match"):
        other_rank.load_lora_weights(path)
    with pytest.raises(ValueError, match="must end in `.lora.h5`"):
        causal_lm.backbone.save_lora_weights(str(tmp_path / "adapters.h5"))


def test_freeze_vision_encoder_trains_projector_and_decoder(causal_lm):
    causal_lm.backbone.freeze_vision_encoder()
    causal_lm.preprocessor.sequence_length = 24
    notebook_compile(causal_lm)
    before = snapshot(causal_lm)
    causal_lm.fit(batch(), batch_size=2, epochs=2, verbose=0)
    after = snapshot(causal_lm)
    changed = {path for path in before if not np.array_equal(before[path], after[path])}
    vision = {path for path in before if path.startswith("vision_encoder/")}
    projector = {path for path in vision if "/projector/" in path}
    assert vision & changed == projector
    assert any(path.startswith("decoder_block_0/") for path in changed)


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "bfloat16"])
def test_low_precision_training_stays_finite(dtype):
    causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET, dtype=dtype)
    causal_lm.preprocessor.sequence_length = 24
    notebook_compile(causal_lm, learning_rate=1e-3)
    history = causal_lm.fit(batch(), batch_size=2, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for variable in causal_lm.weights:
        assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(variable, "float32"))))
    expected_variable_dtype = "float32" if dtype == "mixed_bfloat16" else "bfloat16"
    assert causal_lm.backbone.token_embedding.embeddings.dtype == expected_variable_dtype


def test_fit_accepts_generators_and_in_memory_dicts(causal_lm):
    causal_lm.preprocessor.sequence_length = 24
    notebook_compile(causal_lm)

    def examples():
        data = batch()
        while True:
            for i in range(0, 4, 2):
                yield {key: data[key][i : i + 2] for key in data}

    history = causal_lm.fit(examples(), steps_per_epoch=2, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    history = causal_lm.fit(batch(), batch_size=2, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_rematerialised_decoder_gives_the_same_gradients(tmp_path):
    if BACKEND != "jax":
        pytest.skip("Rematerialisation is offered on JAX (jax.checkpoint).")
    import jax

    def loss_and_grads(causal_lm, x):
        variables = [v.value for v in causal_lm.trainable_variables]

        def loss(values):
            logits, _ = causal_lm.stateless_call(
                values, [v.value for v in causal_lm.non_trainable_variables], x
            )
            return jax.numpy.mean(logits**2)

        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables))
        return jax.value_and_grad(loss)(variables), jaxpr

    plain = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    remat = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    remat.backbone.enable_remat()
    x = preprocessed(plain, batch(2))
    (loss_a, grads_a), plain_jaxpr = loss_and_grads(plain, x)
    (loss_b, grads_b), remat_jaxpr = loss_and_grads(remat, x)
    assert "remat" not in plain_jaxpr and "remat" in remat_jaxpr
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fit_after_enable_remat_matches_plain_fit(monkeypatch):
    """One SGD step with remat makes the same update as without it (so the
    gradients are the same) on every backend (TensorFlow's remat once
    failed on the boolean mask), and on the eager/graph backends each block
    really runs again for the backward pass (JAX: the jaxpr check above)."""
    from keras_paligemma.layers.decoder_block import DecoderBlock

    calls = []
    original_call = DecoderBlock.call

    @functools.wraps(original_call)
    def counted_call(self, *args, **kwargs):
        calls.append(self.name)
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(DecoderBlock, "call", counted_call)
    updates, call_counts = {}, {}
    for remat in (False, True):
        keras.utils.set_random_seed(0)
        causal_lm = PaliGemmaCausalLM.from_preset(TINY_PRESET)
        if remat:
            causal_lm.backbone.enable_remat()
        causal_lm.compile(
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
        )
        before = snapshot(causal_lm)
        calls.clear()
        causal_lm.fit(x=batch(2), batch_size=2, epochs=1, verbose=0, shuffle=False)
        call_counts[remat] = len(calls)
        after = snapshot(causal_lm)
        updates[remat] = {path: after[path] - before[path] for path in before}
    decoder = [path for path in updates[False] if "decoder_block" in path]
    assert decoder and all(np.abs(updates[False][p]).max() > 1e-6 for p in decoder)
    for path, update in updates[False].items():
        np.testing.assert_allclose(updates[True][path], update, rtol=1e-3, atol=1e-6)
    if BACKEND != "jax":
        blocks = len(causal_lm.backbone.decoder_blocks)
        assert call_counts[True] >= call_counts[False] + blocks


def test_generate_after_enable_remat_gives_the_same_answers():
    """Remat wraps each block's call for training; a decoding call (with a
    KV cache) has no backward pass and runs unwrapped, so generation works
    on every backend (TensorFlow's remat takes no keyword arguments in
    graph mode) and gives the plain model's answers."""
    plain = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    remat = PaliGemmaCausalLM.from_preset(TINY_PRESET)
    remat.backbone.enable_remat()
    x = {"images": batch(2)["images"], "prompts": ["caption en", "ocr"]}
    assert remat.generate(x, max_length=16) == plain.generate(x, max_length=16)
