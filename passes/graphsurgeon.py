"""onnx-graphsurgeon adapter: run our pipelines on a `gs.Graph`, and convert both ways.

The conversion goes through ONNX (graphsurgeon's own import/export), so every construct that
graphsurgeon can express survives; opset and metadata travel with the graph.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from ir import Model, from_onnx, to_onnx

from .api import compress

__all__ = ["from_graphsurgeon", "to_graphsurgeon", "apply_graphsurgeon"]


def from_graphsurgeon(graph: gs.Graph) -> Model:
    return from_onnx(gs.export_onnx(graph))


def to_graphsurgeon(model: Model) -> gs.Graph:
    return gs.import_onnx(to_onnx(model))


def apply_graphsurgeon(graph: gs.Graph, spec: str = "cleanup", calibration=None,
                       input_shapes=None) -> gs.Graph:
    """Run the pipeline `spec` on a graphsurgeon graph and return a new graphsurgeon graph."""
    model = from_graphsurgeon(graph)
    compress(model, spec, calibration=calibration, input_shapes=input_shapes)
    return to_graphsurgeon(model)
