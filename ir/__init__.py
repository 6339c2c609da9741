"""The project's graph IR: a small explicit graph with use-def chains, ONNX import/export, shape
inference and cost accounting. See `ir.graph` for the model itself."""

from .check import check_graph, check_model
from .cost import GraphCost, NodeCost, graph_cost, node_macs
from .errors import (CompressError, GraphError, ModelLoadError, ShapeError,
                     UnsupportedModelError)
from .graph import Graph, Model, Node, Value, downstream_nodes, is_static_shape
from .nx_view import to_networkx
from .onnx_io import copy_model, from_onnx, load_model, model_bytes, save_model, to_onnx
from .shape_inference import (dynamic_inputs, infer_shapes, parse_shape_spec,
                              require_static_inputs, set_input_shapes)

__all__ = [
    "Graph", "Model", "Node", "Value", "is_static_shape", "downstream_nodes",
    "load_model", "from_onnx", "to_onnx", "copy_model", "save_model", "model_bytes",
    "infer_shapes", "set_input_shapes", "require_static_inputs", "dynamic_inputs",
    "parse_shape_spec",
    "graph_cost", "node_macs", "GraphCost", "NodeCost",
    "check_graph", "check_model", "to_networkx",
    "CompressError", "GraphError", "ModelLoadError", "ShapeError", "UnsupportedModelError",
]
