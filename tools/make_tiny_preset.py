"""Write the tiny random-weight PaliGemma 2 preset shipped in `presets/`.

The preset has the real architecture (SigLIP + projector + Gemma 2 decoder
with soft-caps and post-norms) at toy sizes, random weights, and a small
SentencePiece vocabulary laid out like the real one: `<pad>`, `<eos>`,
`<bos>`, `<unk>` at ids 0-3, ordinary pieces, then `<loc0000>`..`<loc1023>`
and `<seg000>`..`<seg127>`. Its answers are random until the fine-tuning
work ships a trained demo preset.

    python tools/make_tiny_preset.py presets/pali_gemma_tiny_random
"""

import argparse
import io
import os

import keras

CORPUS = [
    "caption en",
    "describe en",
    "answer en what color is the square?",
    "answer en how many circles are there?",
    "detect circle ; square ; triangle",
    "segment triangle",
    "ocr",
    "a red circle and a blue square on a white background",
    "a green triangle next to a yellow circle",
    "the cow is standing on the beach",
    "two cats sleeping on a sofa",
    "question en what is in the image?",
]


def train_vocabulary(vocabulary_size=320):
    """A SentencePiece proto with PaliGemma's special-token layout."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    stream = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 50),
        model_writer=stream,
        vocab_size=vocabulary_size,
        model_type="BPE",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        byte_fallback=True,
        minloglevel=2,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(stream.getvalue())
    special = [f"<loc{i:04d}>" for i in range(1024)]
    special += [f"<seg{i:03d}>" for i in range(128)]
    for text in special:
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = 0.0
        piece.type = model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return proto.SerializeToString()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        raise SystemExit(f"{args.output_dir} exists and is not empty.")

    import keras_paligemma as kp

    keras.utils.set_random_seed(args.seed)
    tokenizer = kp.PaliGemmaTokenizer(proto=train_vocabulary())
    backbone = kp.PaliGemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_size=56,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=64,
        ffw_hidden_dim=128,
        head_dim=16,
        vit_patch_size=14,
        vit_num_heads=2,
        vit_hidden_dim=32,
        vit_num_layers=2,
        vit_intermediate_dim=64,
        query_pre_attn_scalar=16,
        use_post_norms=True,
        attention_logit_softcap=50.0,
        final_logit_softcap=30.0,
    )
    preprocessor = kp.PaliGemmaCausalLMPreprocessor(
        tokenizer=tokenizer,
        image_converter=kp.PaliGemmaImageConverter(image_size=(56, 56)),
        sequence_length=64,
    )
    causal_lm = kp.PaliGemmaCausalLM(backbone, preprocessor)
    causal_lm.save_to_preset(args.output_dir)
    print(f"Wrote {args.output_dir}: {backbone.count_params():,} parameters.")


if __name__ == "__main__":
    main()
