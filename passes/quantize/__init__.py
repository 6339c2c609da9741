"""Quantization: static int8 post-training quantization to QDQ ONNX (`quantize`) and cross-layer
equalization (`equalize`). See `quantize.Quantize`."""

from .equalize import Equalize, equalize_model
from .metadata import METADATA_KEY, quantization_of, restore_quant_meta
from .quantize import Quantize

__all__ = ["Quantize", "Equalize", "equalize_model", "quantization_of", "restore_quant_meta",
           "METADATA_KEY"]
