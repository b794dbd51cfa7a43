"""Tiny random HF transformers PaliGemma models: the numerical oracle.

Builds `PaliGemmaForConditionalGeneration` (Gemma or Gemma 2 decoder) with
random weights, eager float32 attention and randomised norm scales, and
runs it on the same inputs our models get.
"""

import numpy as np
import torch
import transformers

IMAGE_SIZE = 28
VOCABULARY_SIZE = 1200


def tiny_model(generation, sliding_window=4, seed=0, vocabulary_size=VOCABULARY_SIZE):
    """A random PaliGemma 1 (`generation=1`) or 2 model, in eval mode.

    The image token id is `vocabulary_size` (outside the vocabulary).
    """
    torch.manual_seed(seed)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=14,
        vision_use_head=False,
    )
    common = dict(
        vocab_size=vocabulary_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        head_dim=8,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        initializer_range=0.2,
    )
    if generation == 1:
        text = transformers.GemmaConfig(
            **common, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh"
        )
    else:
        text = transformers.Gemma2Config(
            **common,
            num_key_value_heads=2,
            hidden_activation="gelu_pytorch_tanh",
            # Not head_dim, so a wrong query scaling shows in the logits.
            query_pre_attn_scalar=12,
            sliding_window=sliding_window,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    config = transformers.PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocabulary_size,
        vocab_size=vocabulary_size,
        projection_dim=32,
        hidden_size=32,
    )
    config._attn_implementation = "eager"
    model = transformers.PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and parameter.dim() == 1:
                parameter.normal_(0, 0.3)
    return model


def image_token_id(model):
    return model.config.image_token_index


def num_image_tokens(model):
    return model.config.text_config.num_image_tokens


def pixel_values(images):
    """Our `[-1, 1]` NHWC images as transformers' NCHW pixel values.

    Several images per example (`(batch, n, h, w, 3)`) are flattened in
    order, as transformers expects them.
    """
    images = np.asarray(images, "float32")
    images = images.reshape((-1,) + images.shape[-3:])
    return torch.tensor(images.transpose(0, 3, 1, 2))


def logits(model, images, token_ids, padding_mask, response_mask):
    """Logits over the text positions for right-padded text inputs."""
    images_per_example = images.shape[1] if np.ndim(images) == 5 else 1
    n = num_image_tokens(model) * images_per_example
    batch = token_ids.shape[0]
    image_ids = np.full((batch, n), image_token_id(model))
    input_ids = np.concatenate([image_ids, token_ids], axis=1)
    attention = np.concatenate([np.ones((batch, n)), padding_mask], axis=1)
    token_types = np.concatenate([np.zeros((batch, n)), response_mask], 1)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(input_ids),
            pixel_values=pixel_values(images),
            attention_mask=torch.tensor(attention, dtype=torch.long),
            token_type_ids=torch.tensor(token_types, dtype=torch.long),
        )
    return out.logits[:, n:].numpy()


def greedy(model, images, prompts, max_new_tokens):
    """Greedy answers (lists of ids, `<eos>` excluded) for token prompts.

    The prompts (lists of ids, `<bos>` ... `\\n` included) are left-padded
    into one batch, as transformers generates.
    """
    n = num_image_tokens(model)
    width = max(len(p) for p in prompts)
    input_ids, attention = [], []
    for prompt in prompts:
        pad = width - len(prompt)
        input_ids.append([0] * pad + [image_token_id(model)] * n + list(prompt))
        attention.append([0] * pad + [1] * (n + len(prompt)))
    input_ids = torch.tensor(input_ids)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values(images),
            attention_mask=torch.tensor(attention),
            token_type_ids=torch.zeros_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=0,
        )
    answers = []
    for row in out[:, input_ids.shape[1] :].tolist():
        answers.append(row[: row.index(1)] if 1 in row else row)
    return answers
