"""Evaluate one node on constant inputs (for constant folding).

onnxruntime runs the node in a one-node model (fast, covers every standard op); where it refuses,
onnx's reference evaluator is tried. A node that neither can evaluate raises `NotEvaluable` and is
simply left in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import Model, Node
from .onnx_io import array_to_tensor, node_to_onnx

__all__ = ["evaluate_node", "NotEvaluable"]


class NotEvaluable(Exception):
    """The node could not be evaluated on its constant inputs."""


def evaluate_node(node: Node, model: Model) -> list[np.ndarray | None]:
    """Outputs of `node` computed from its inputs' constant data (None for omitted outputs)."""
    proto = _single_node_model(node, model)
    try:
        return _run_onnxruntime(proto, node)
    except Exception:
        pass
    try:
        from onnx.reference import ReferenceEvaluator
        evaluator = ReferenceEvaluator(proto)
        names = [v.name for v in node.outputs if v is not None]
        results = dict(zip(names, evaluator.run(names, {})))
    except Exception as exc:
        raise NotEvaluable(str(exc)) from None
    return _tensors_only(node, results)


def _tensors_only(node: Node, results: dict) -> list[np.ndarray | None]:
    """Only tensor results can become constants: sequences, maps and optionals stay computed."""
    outputs = []
    for value in node.outputs:
        if value is None:
            outputs.append(None)
            continue
        result = results[value.name]
        if isinstance(result, np.generic):
            result = np.asarray(result)
        if not isinstance(result, np.ndarray):
            raise NotEvaluable(f"{value.name!r} is not a tensor")
        outputs.append(result)
    return outputs


def _single_node_model(node: Node, model: Model) -> onnx.ModelProto:
    initializers = []
    for value in node.inputs:
        if value is not None and not any(t.name == value.name for t in initializers):
            initializers.append(array_to_tensor(value.const, value.name))
    outputs = [onnx.ValueInfoProto(name=v.name) for v in node.outputs if v is not None]
    graph = helper.make_graph([node_to_onnx(node, value_info=False)], "fold", [], outputs,
                              initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in model.opset_imports.items()])
    proto.ir_version = max(model.ir_version, 4)
    proto.functions.extend(model.functions)
    return proto


def _run_onnxruntime(proto: onnx.ModelProto, node: Node) -> list[np.ndarray | None]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [v.name for v in node.outputs if v is not None]
    return _tensors_only(node, dict(zip(names, session.run(names, {}))))
