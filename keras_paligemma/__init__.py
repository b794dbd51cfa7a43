"""keras_paligemma: PaliGemma and PaliGemma 2 in Keras 3 (JAX, TensorFlow, PyTorch)."""

from keras_paligemma.export.saved_model import export_backbone
from keras_paligemma.export.saved_model import export_saved_model
from keras_paligemma.models.backbone import PaliGemmaBackbone
from keras_paligemma.models.causal_lm import PaliGemmaCausalLM
from keras_paligemma.models.image_converter import PaliGemmaImageConverter
from keras_paligemma.models.preprocessor import PaliGemmaCausalLMPreprocessor
from keras_paligemma.models.task_methods import Answer
from keras_paligemma.models.tokenizer import PaliGemmaTokenizer
from keras_paligemma.outputs.detection import Detection
from keras_paligemma.outputs.detection import parse_detections
from keras_paligemma.outputs.drawing import draw_results
from keras_paligemma.outputs.mask_decoder import MaskDecoder
from keras_paligemma.outputs.segmentation import Segmentation
from keras_paligemma.outputs.segmentation import parse_segmentations

__version__ = "0.1.0"

__all__ = [
    "Answer",
    "Detection",
    "MaskDecoder",
    "PaliGemmaBackbone",
    "PaliGemmaCausalLM",
    "PaliGemmaCausalLMPreprocessor",
    "PaliGemmaImageConverter",
    "PaliGemmaTokenizer",
    "Segmentation",
    "draw_results",
    "export_backbone",
    "export_saved_model",
    "parse_detections",
    "parse_segmentations",
]
