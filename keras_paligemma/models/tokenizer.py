"""PaliGemmaTokenizer: Gemma's SentencePiece vocabulary with location and segmentation tokens."""

import keras
import keras_hub

from keras_paligemma.models.backbone import PaliGemmaBackbone


@keras.saving.register_keras_serializable(package="keras_paligemma")
class PaliGemmaTokenizer(keras_hub.models.GemmaTokenizer):
    """SentencePiece tokenizer of PaliGemma (257,152 tokens in the release).

    The release vocabulary is Gemma's 256,000 pieces followed by
    `<loc0000>`..`<loc1023>` (ids 256000-257023) and `<seg000>`..`<seg127>`
    (ids 257024-257151); ids 0, 1, 2 are `<pad>`, `<eos>`, `<bos>`. Any
    SentencePiece model holding `<pad>`, `<bos>` and `<eos>` pieces works,
    which is how the tiny presets in `presets/` ship their own vocabulary.
    Tokenization runs in plain Python, or in TensorFlow inside `tf.data`.

    Args:
        proto: the SentencePiece model, as bytes or a file path.

    Example:

    >>> tokenizer = PaliGemmaTokenizer.from_preset(
    ...     "presets/pali_gemma_tiny_random")
    >>> ids = tokenizer("<loc0012> cat")
    >>> tokenizer.id_to_token(int(ids[0]))
    '<loc0012>'
    """

    backbone_cls = PaliGemmaBackbone
