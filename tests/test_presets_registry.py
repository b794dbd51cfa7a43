"""The registry of official checkpoints: configs, sizes, names, downloads."""

import pytest

import keras_paligemma as kp
from conftest import BACKEND
from keras_paligemma import presets


def test_every_official_checkpoint_is_listed():
    names = set(kp.PaliGemmaCausalLM.presets)
    assert names == set(kp.PaliGemmaBackbone.presets)
    assert len(names) == 5 + 9 + 6 + 2
    for scale in ("3b", "10b", "28b"):
        for size in (224, 448, 896):
            assert f"pali_gemma2_pt_{scale}_{size}" in names
    entry = presets.get_preset("pali_gemma2_mix_28b_448")
    assert entry["hf_repo"] == "google/paligemma2-28b-mix-448"
    assert entry["kaggle_handle"].startswith("kaggle://keras/paligemma2/")
    assert entry["config"]["query_pre_attn_scalar"] == 144


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="building 28B parameters without allocating them needs torch's "
    "meta device; JAX and TensorFlow allocate every variable",
)
@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_config_builds_with_the_official_parameter_count(name):
    import keras

    entry = presets.PRESETS[name]
    with keras.device("meta"):
        backbone = kp.PaliGemmaBackbone(**entry["config"])
    assert backbone.count_params() == entry["params"]


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="pali_gemma2_mix_3b_224"):
        kp.PaliGemmaCausalLM.from_preset("pali_gemma2_mix_3b_244")


def test_download_failure_is_fast_and_names_the_fix(monkeypatch):
    import kagglehub

    def offline(handle, *args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(RuntimeError) as error:
        kp.PaliGemmaCausalLM.from_preset("pali_gemma2_mix_3b_224")
    message = str(error.value)
    assert "kaggle://keras/paligemma2/keras/pali_gemma2_mix_3b_224/2" in message
    assert "KAGGLE_USERNAME" in message and "licence" in message


def test_hf_download_failure_names_the_repo_and_the_fix(monkeypatch):
    import huggingface_hub

    def offline(repo, *args, **kwargs):
        raise OSError("unauthorized")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError) as error:
        kp.PaliGemmaBackbone.from_preset("hf://google/paligemma2-3b-pt-224")
    message = str(error.value)
    assert "hf://google/paligemma2-3b-pt-224" in message
    assert "HF_TOKEN" in message and "licence" in message


def test_hf_handle_loads_the_downloaded_snapshot(monkeypatch, tmp_path):
    import huggingface_hub

    import transformers_oracle as oracle

    reference = oracle.tiny_model(1)
    reference.save_pretrained(str(tmp_path))
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo, **kwargs: str(tmp_path)
    )
    backbone = kp.PaliGemmaBackbone.from_preset("hf://someone/tiny-paligemma")
    assert backbone.num_layers == reference.config.text_config.num_hidden_layers
