"""Test helper: write a transformers PaliGemma's weights as a big_vision .npz.

Uses big_vision's parameter names and layouts (layers stacked on a leading
axis, einsum kernels), written here from the documented layout, so the
loader is checked against an independent description of the format.
"""

import numpy as np


def write(model, path, bfloat16=False):
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config = model.config
    text, vision = config.text_config, config.vision_config
    heads, width = vision.num_attention_heads, vision.hidden_size
    n, k, h, d = (text.num_attention_heads, text.num_key_value_heads,
                  text.head_dim, text.hidden_size)
    vt = "model.vision_tower.vision_model." if any(
        key.startswith("model.vision_tower.vision_model.") for key in state
    ) else "model.vision_tower."
    lm = "model.language_model."

    def stack(template, count, transform=lambda a: a):
        return np.stack([transform(state[template.format(i)]) for i in range(count)])

    out = {
        "img/embedding/kernel": state[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": state[vt + "embeddings.patch_embedding.bias"],
        "img/pos_embedding": state[vt + "embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": state[vt + "post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": state[vt + "post_layernorm.bias"],
        "img/head/kernel": state["model.multi_modal_projector.linear.weight"].T,
        "img/head/bias": state["model.multi_modal_projector.linear.bias"],
        "llm/embedder/input_embedding": state[lm + "embed_tokens.weight"],
        "llm/final_norm/scale": state[lm + "norm.weight"],
    }
    block = "img/Transformer/encoderblock/"
    layer = vt + "encoder.layers.{}."
    count = vision.num_hidden_layers
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        out[f"{block}{ours}/scale"] = stack(layer + theirs + ".weight", count)
        out[f"{block}{ours}/bias"] = stack(layer + theirs + ".bias", count)
    attention = block + "MultiHeadDotProductAttention_0/"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{attention}{ours}/kernel"] = stack(
            layer + f"self_attn.{theirs}.weight", count,
            lambda w: w.T.reshape(width, heads, -1))
        out[f"{attention}{ours}/bias"] = stack(
            layer + f"self_attn.{theirs}.bias", count, lambda b: b.reshape(heads, -1))
    out[f"{attention}out/kernel"] = stack(
        layer + "self_attn.out_proj.weight", count, lambda w: w.T.reshape(heads, -1, width))
    out[f"{attention}out/bias"] = stack(layer + "self_attn.out_proj.bias", count)
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        out[f"{block}MlpBlock_0/{ours}/kernel"] = stack(layer + f"mlp.{theirs}.weight", count, np.transpose)
        out[f"{block}MlpBlock_0/{ours}/bias"] = stack(layer + f"mlp.{theirs}.bias", count)

    layer = lm + "layers.{}."
    count = text.num_hidden_layers
    out["llm/layers/attn/q_einsum/w"] = stack(
        layer + "self_attn.q_proj.weight", count,
        lambda w: w.T.reshape(d, n, h).transpose(1, 0, 2))
    out["llm/layers/attn/kv_einsum/w"] = np.stack([
        np.stack([state[layer.format(i) + f"self_attn.{p}.weight"].T.reshape(d, k, h).transpose(1, 0, 2)
                  for p in ("k_proj", "v_proj")])
        for i in range(count)])
    out["llm/layers/attn/attn_vec_einsum/w"] = stack(
        layer + "self_attn.o_proj.weight", count, lambda w: w.T.reshape(n, h, d))
    out["llm/layers/mlp/gating_einsum"] = np.stack([
        np.stack([state[layer.format(i) + f"mlp.{p}.weight"].T for p in ("gate_proj", "up_proj")])
        for i in range(count)])
    out["llm/layers/mlp/linear"] = stack(layer + "mlp.down_proj.weight", count, np.transpose)
    if text.model_type == "gemma2":
        norms = {"input_layernorm": "pre_attention_norm",
                 "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "pre_ffw_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
    else:
        norms = {"input_layernorm": "pre_attention_norm",
                 "post_attention_layernorm": "pre_ffw_norm"}
    for theirs, ours in norms.items():
        out[f"llm/layers/{ours}/scale"] = stack(layer + theirs + ".weight", count)
    if bfloat16:
        import ml_dtypes

        out = {key: value.astype(ml_dtypes.bfloat16) for key, value in out.items()}
    np.savez(path, **{"params/" + key: value for key, value in out.items()})
