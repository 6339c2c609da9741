"""Loaders for the real models that the `onnx` wheel ships under onnx/backend/test/data/light.

These are ImageNet CNNs (ResNet50, DenseNet121, Inception v1/v2, ShuffleNet, SqueezeNet, VGG19,
AlexNet, ZFNet512) in their original opset-9 exports. Their weights are generated in-graph by
ConstantOfShape nodes (constant values, which keeps the wheel small), so they are real graphs with
synthetic weights: good for checking that every pass survives real topologies, not for accuracy.
Each comes with one reference output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["LIGHT_MODELS", "light_model_path", "light_model_reference"]

LIGHT_MODELS = ("resnet50", "densenet121", "inception_v1", "inception_v2", "shufflenet",
                "squeezenet", "vgg19", "bvlc_alexnet", "zfnet512")


def _light_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def light_model_path(name: str) -> Path:
    """Path of `light_<name>.onnx`; raises KeyError naming the known models otherwise."""
    if name not in LIGHT_MODELS:
        raise KeyError(f"unknown light model {name!r}; known: {', '.join(LIGHT_MODELS)}")
    return _light_dir() / f"light_{name}.onnx"


def light_model_reference(name: str) -> np.ndarray:
    """The reference output shipped with the model. No input is shipped: with constant weights
    every class scores the same, so the output is uniform (1/1000) for any input. It checks the
    plumbing, not numerics; numeric checks compare against onnxruntime on random inputs instead."""
    tensor = onnx.TensorProto()
    tensor.ParseFromString((_light_dir() / f"light_{name}_output_0.pb").read_bytes())
    return numpy_helper.to_array(tensor)
