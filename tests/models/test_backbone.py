import keras
import numpy as np
import pytest
from keras import ops

from keras_paligemma import PaliGemmaBackbone

TINY = dict(
    vocabulary_size=64,
    image_size=28,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=16,
    ffw_hidden_dim=32,
    head_dim=8,
    vit_num_heads=2,
    vit_hidden_dim=16,
    vit_num_layers=1,
    vit_intermediate_dim=32,
)
GEMMA2 = dict(
    use_post_norms=True,
    attention_logit_softcap=50.0,
    final_logit_softcap=30.0,
    query_pre_attn_scalar=12,
    sliding_window=3,
)


def inputs(batch=2, length=7):
    rng = np.random.default_rng(0)
    padding = np.ones((batch, length), "int32")
    padding[1, 5:] = 0
    response = np.zeros((batch, length), "int32")
    response[:, 3:] = 1
    return {
        "images": rng.uniform(-1, 1, (batch, 28, 28, 3)).astype("float32"),
        "token_ids": rng.integers(3, 64, (batch, length)).astype("int32"),
        "padding_mask": padding,
        "response_mask": response * padding,
    }


@pytest.mark.parametrize("extra", [{}, GEMMA2], ids=["gemma", "gemma2"])
def test_output_shape_and_config_round_trip(extra):
    backbone = PaliGemmaBackbone(**TINY, **extra)
    assert backbone.num_image_tokens == 4
    hidden = backbone(inputs())
    assert tuple(hidden.shape) == (2, 7, 16)
    clone = PaliGemmaBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_allclose(
        ops.convert_to_numpy(clone(inputs())),
        ops.convert_to_numpy(hidden),
        atol=1e-6,
    )
    assert clone.get_config() == backbone.get_config()


def test_padding_does_not_change_real_tokens():
    backbone = PaliGemmaBackbone(**TINY, **GEMMA2)
    x = inputs()
    short = {k: v[1:2, :5] if k != "images" else v[1:2] for k, v in x.items()}
    padded = ops.convert_to_numpy(backbone(x))[1, :5]
    alone = ops.convert_to_numpy(backbone(short))[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)


def test_prefix_tokens_ignore_the_answer():
    backbone = PaliGemmaBackbone(**TINY)
    x = inputs()
    changed = {**x, "token_ids": x["token_ids"].copy()}
    changed["token_ids"][:, 4:] = 5
    before = ops.convert_to_numpy(backbone(x))
    after = ops.convert_to_numpy(backbone(changed))
    np.testing.assert_allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert np.abs(before[0, 4:] - after[0, 4:]).max() > 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mixed_bfloat16"])
def test_low_precision_policies_run_close_to_float32(dtype):
    # Seeded: some unseeded draws of these tiny random weights drift past
    # 0.1 in bfloat16 (0.12 seen once in CI); seeds 0-5 drift 0.03-0.07.
    keras.utils.set_random_seed(0)
    reference = PaliGemmaBackbone(**TINY, **GEMMA2)
    low = PaliGemmaBackbone(**TINY, **GEMMA2, dtype=dtype)
    low.set_weights(reference.get_weights())
    expected = ops.convert_to_numpy(reference(inputs()))
    got = ops.convert_to_numpy(ops.cast(low(inputs()), "float32"))
    assert np.isfinite(got).all()
    valid = inputs()["padding_mask"].astype(bool)
    assert np.abs(got - expected)[valid].max() < 0.1
    assert low.token_embedding.compute_dtype != "float32"


def test_bad_head_configuration_is_named():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        PaliGemmaBackbone(**{**TINY, "num_key_value_heads": 3})
