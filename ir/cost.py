"""Cost of a graph: MACs, parameter count and byte size, per node and in total.

MACs count multiply-accumulates of the compute-heavy ops (convolutions and matrix products, the
ones compression targets); elementwise ops, pooling and normalization are counted as zero, as is
usual for this metric. Parameters are the elements of weight-like constants: floating point and
8-bit/4-bit integer initializers. Shape, axis and index constants (int32/int64) are not parameters.
`bytes` is the storage of all constants. Values must have inferred shapes (see shape_inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, Node, Value, is_static_shape

__all__ = ["GraphCost", "NodeCost", "graph_cost", "node_macs", "is_parameter"]


@dataclass
class NodeCost:
    macs: int = 0
    params: int = 0
    nonzero_params: int = 0
    bytes: int = 0


@dataclass
class GraphCost:
    """Totals for a graph plus the per-node breakdown (keyed by node name)."""
    nodes: int = 0
    macs: int = 0
    params: int = 0
    nonzero_params: int = 0
    bytes: int = 0
    per_node: dict[str, NodeCost] = field(default_factory=dict)

    def summary(self) -> dict[str, int]:
        return {"nodes": self.nodes, "params": self.params, "nonzero_params": self.nonzero_params,
                "macs": self.macs, "bytes": self.bytes}


def is_parameter(value: Value) -> bool:
    """Whether a constant counts as a model parameter (weights, biases, scales)."""
    if not value.is_constant:
        return False
    dtype = value.const.dtype
    if dtype == object:
        return False
    if dtype.kind == "f" or dtype.name in _LOW_PRECISION_FLOATS:
        return True
    return (dtype.kind in "iu" and dtype.itemsize == 1) or dtype.name in ("int4", "uint4")


_LOW_PRECISION_FLOATS = ("bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                         "float8_e5m2fnuz")


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape is not None else 0


def _conv_macs(node: Node) -> int:
    out, weight = node.output, node.input(1)
    if not is_static_shape(out.shape) or weight is None or not is_static_shape(weight.shape):
        return 0
    # weight OIHW (Cin per group in dim 1): each output element reads Cin/g * prod(kernel) inputs.
    return _numel(out.shape) * _numel(weight.shape[1:])


def _conv_transpose_macs(node: Node) -> int:
    data, weight = node.input(0), node.input(1)
    if not is_static_shape(data.shape) or weight is None or not is_static_shape(weight.shape):
        return 0
    # weight (Cin, Cout/g, k...): each input element scatters into Cout/g * prod(kernel) outputs.
    return _numel(data.shape) * _numel(weight.shape[1:])


def _matmul_macs(node: Node) -> int:
    a, out = node.input(0), node.output
    if a is None or not is_static_shape(a.shape) or not is_static_shape(out.shape) or not a.shape:
        return 0
    reduction = a.shape[-1]
    if node.op_type == "Gemm" and node.attr("transA", 0) and len(a.shape) == 2:
        reduction = a.shape[0]
    return _numel(out.shape) * int(reduction)


_MACS_RULES = {
    "Conv": _conv_macs,
    "ConvInteger": _conv_macs,
    "QLinearConv": lambda n: 0,
    "ConvTranspose": _conv_transpose_macs,
    "MatMul": _matmul_macs,
    "MatMulInteger": _matmul_macs,
    "Gemm": _matmul_macs,
}


def node_macs(node: Node) -> int:
    rule = _MACS_RULES.get(node.op_type)
    return int(rule(node)) if rule else 0


def graph_cost(graph: Graph) -> GraphCost:
    """Total and per-node cost. A constant read by several nodes is charged to the first."""
    total = GraphCost(nodes=len(graph.nodes))
    charged: set[int] = set()
    for node in graph.nodes:
        cost = NodeCost(macs=node_macs(node))
        for value in node.inputs:
            if value is None or not value.is_constant or id(value) in charged:
                continue
            charged.add(id(value))
            cost.bytes += int(value.const.nbytes)
            if is_parameter(value):
                cost.params += int(value.const.size)
                cost.nonzero_params += int(np.count_nonzero(value.const))
        total.per_node[node.name] = cost
        total.macs += cost.macs
        total.params += cost.params
        total.nonzero_params += cost.nonzero_params
        total.bytes += cost.bytes
    for value in graph.initializers.values():  # constants read only by subgraphs or outputs
        if id(value) not in charged:
            total.bytes += int(value.const.nbytes)
            if is_parameter(value):
                total.params += int(value.const.size)
                total.nonzero_params += int(np.count_nonzero(value.const))
    return total
