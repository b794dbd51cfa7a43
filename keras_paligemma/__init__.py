"""keras_paligemma: PaliGemma and PaliGemma 2 in Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_paligemma.export.saved_model import export_backbone
from keras_paligemma.export.saved_model import export_saved_model
from keras_paligemma.models.backbone import PaliGemmaBackbone
from keras_paligemma.models.causal_lm import PaliGemmaCausalLM
from keras_paligemma.models.image_converter import PaliGemmaImageConverter
from keras_paligemma.models.preprocessor import PaliGemmaCausalLMPreprocessor
from keras_paligemma.models.tokenizer import PaliGemmaTokenizer

__version__ = "0.1.0"

__all__ = [
    "PaliGemmaBackbone",
    "PaliGemmaCausalLM",
    "PaliGemmaCausalLMPreprocessor",
    "PaliGemmaImageConverter",
    "PaliGemmaTokenizer",
    "export_backbone",
    "export_saved_model",
]
