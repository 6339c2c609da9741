"""ONNX export of compressed models: dense-with-zeros weights by default, optionally ONNX sparse
initializers for the weights that `sparsify` recorded."""

from .export import export_onnx, to_onnx_proto

__all__ = ["export_onnx", "to_onnx_proto"]
