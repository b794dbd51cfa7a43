"""keras-hub PaliGemma presets load into our classes with the same numbers."""

import os

import keras
import keras_hub
import numpy as np
import pytest
from keras import ops

from conftest import TINY_PRESET
from keras_paligemma.checkpoints import keras_hub as converter

TINY = dict(
    vocabulary_size=1472,
    image_size=28,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=32,
    intermediate_dim=128,
    head_dim=8,
    vit_patch_size=14,
    vit_num_heads=2,
    vit_hidden_dim=32,
    vit_num_layers=2,
    vit_intermediate_dim=64,
)
GEMMA2 = dict(
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_sliding_window_attention=True,
    sliding_window_size=4096,
    # 28B-style flag; with 32 / 4 = 8 = head_dim both readings agree.
    query_head_dim_normalize=False,
)


@pytest.fixture(scope="module", params=["paligemma1", "paligemma2"])
def saved(request, tmp_path_factory):
    """A random keras-hub PaliGemma saved with keras-hub's save_to_preset."""
    keras.utils.set_random_seed(0)
    extra = GEMMA2 if request.param == "paligemma2" else {}
    backbone = keras_hub.models.PaliGemmaBackbone(**{**TINY, **extra})
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        if "norm" in variable.path and len(variable.shape) == 1:
            variable.assign(rng.normal(0, 0.3, variable.shape))
        elif "token_embedding" in variable.path:
            variable.assign(rng.normal(0, 0.5, variable.shape))
    with open(os.path.join(TINY_PRESET, "assets", "tokenizer", "vocabulary.spm"), "rb") as f:
        tokenizer = keras_hub.models.PaliGemmaTokenizer(proto=f.read())
    preprocessor = keras_hub.models.PaliGemmaCausalLMPreprocessor(
        tokenizer=tokenizer,
        image_converter=keras_hub.layers.PaliGemmaImageConverter(
            image_size=(28, 28), scale=1 / 127.5, offset=-1
        ),
        sequence_length=24,
    )
    causal_lm = keras_hub.models.PaliGemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    path = os.path.join(tmp_path_factory.mktemp("keras_hub"), request.param)
    causal_lm.save_to_preset(path)
    return causal_lm, path


def test_logits_match_keras_hub(saved):
    reference, path = saved
    ours = converter.load_causal_lm(path)
    rng = np.random.default_rng(1)
    inputs = {
        "images": rng.uniform(-1, 1, (2, 28, 28, 3)).astype("float32"),
        "token_ids": rng.integers(3, 1400, (2, 10)).astype("int32"),
        "padding_mask": np.ones((2, 10), "int32"),
        "response_mask": (np.arange(10) >= 6).astype("int32")[None].repeat(2, 0),
    }
    hidden = reference.backbone(inputs)[:, reference.backbone.image_sequence_length :]
    expected = ops.convert_to_numpy(
        reference.backbone.token_embedding(hidden, reverse=True)
    )
    got = ops.convert_to_numpy(ours(inputs))
    difference = np.abs(got - expected).max()
    print(f"max |logit difference| vs keras-hub = {difference:.2e}")
    assert difference < 1e-4


def test_greedy_generation_matches_keras_hub(saved):
    from keras_paligemma import PaliGemmaCausalLM

    reference, path = saved
    ours = PaliGemmaCausalLM.from_preset(path)  # recognised as keras-hub
    image = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype="uint8")
    for prompt in ["caption en", "answer en what color is the square?"]:
        expected = reference.generate(
            {"images": image, "prompts": prompt + "\n"}, max_length=24
        )
        assert ours.generate({"images": image, "prompts": prompt}, max_length=24) == expected


def test_not_a_keras_hub_preset_is_refused():
    with pytest.raises(ValueError, match="keras_hub>PaliGemmaBackbone"):
        converter.load_backbone(TINY_PRESET)


def test_shape_mismatch_names_the_variable(saved):
    reference, path = saved
    config = converter.backbone_config(reference.backbone.get_config())
    config["vocabulary_size"] += 1
    from keras_paligemma import PaliGemmaBackbone

    wrong = PaliGemmaBackbone(**config)
    with pytest.raises(ValueError, match=r"token_embedding/embeddings.*\(1473, 32\).*\(1472, 32\)"):
        converter.load_weights(wrong, path, config)


def test_28b_query_scaling_follows_the_config_not_keras_hub():
    # keras-hub 0.32 scales queries by head_dim even when
    # query_head_dim_normalize=False; PaliGemma 2 28B was trained with
    # hidden_dim / num_query_heads = 4608 / 32 = 144 (transformers:
    # query_pre_attn_scalar=144), which is what we load.
    config = converter.backbone_config(
        {**TINY, **GEMMA2, "hidden_dim": 4608, "num_query_heads": 32,
         "head_dim": 128}
    )
    assert config["query_pre_attn_scalar"] == 144
    config = converter.backbone_config({**TINY, **GEMMA2, "query_head_dim_normalize": True})
    assert config["query_pre_attn_scalar"] == TINY["head_dim"]


def _keras_hub_backbone(dtype=None):
    keras.utils.set_random_seed(3)
    return keras_hub.models.PaliGemmaBackbone(**TINY, dtype=dtype)


def test_sharded_and_bfloat16_presets_load(tmp_path):
    import ml_dtypes

    source = _keras_hub_backbone(dtype="bfloat16")
    path = str(tmp_path / "sharded")
    source.save_to_preset(path, max_shard_size=0.0001)
    assert "model.weights.json" in os.listdir(path)
    assert len(converter.weight_files(path)) > 1
    ours = converter.load_backbone(path)
    embedding = ops.convert_to_numpy(source.token_embedding.embeddings)
    assert embedding.dtype == ml_dtypes.bfloat16
    got = ops.convert_to_numpy(ours.token_embedding.embeddings)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, embedding.astype("float32"))


def test_truncated_weights_file_is_named(tmp_path):
    path = str(tmp_path / "preset")
    _keras_hub_backbone().save_to_preset(path)
    weights = os.path.join(path, "model.weights.h5")
    with open(weights, "rb") as f:
        data = f.read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.weights.h5"):
        converter.load_backbone(path)


def test_unknown_weight_is_refused():
    with pytest.raises(ValueError, match="layers/unknown/vars/0"):
        converter.our_variable("layers/unknown/vars/0", np.zeros(3), {})


@pytest.mark.parametrize("extra", [{}, GEMMA2])
def test_keras_hub_config_inverts_backbone_config(extra):
    config = converter.backbone_config({**TINY, **extra})
    assert converter.backbone_config(converter.keras_hub_config(config)) == config
