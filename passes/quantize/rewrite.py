"""The QDQ rewrite: int8 weight constants behind DequantizeLinear, and QuantizeLinear ->
DequantizeLinear pairs in front of the activations that quantized layers read.

    x ──Q(s_x, z_x)──DQ──┐
                          Conv/MatMul/Gemm ── y (float; bias stays float)
    W_int8 ──DQ(s_w[c], axis)──┘

This is the QDQ format onnxruntime (and TensorRT, and our TVM backend) pattern-match into
integer kernels. The scales stay in the graph as constants and in `value.meta["quant"]`.
"""

from __future__ import annotations

import numpy as np

from ir import Graph, Node, Value

from .qparams import QuantParams, quantize_weight

__all__ = ["quantize_weight_input", "insert_activation_qdq"]


def _param_constants(graph: Graph, base: str, params: QuantParams) -> tuple[Value, Value]:
    scale = graph.add_constant(f"{base}_scale", params.scale.astype(np.float32))
    zero_point = graph.add_constant(f"{base}_zero_point", params.zero_point)
    return scale, zero_point


def quantize_weight_input(graph: Graph, node: Node, index: int, params: QuantParams,
                          cache: dict) -> Value:
    """Replace the float weight `node.inputs[index]` by DQ(int8 weight); returns the int8 value.

    `cache` maps id(float weight) -> DQ output so a weight shared by several layers is stored
    once. The float constant stays only if something else still reads it.
    """
    weight = node.inputs[index]
    key = (id(weight), params.axis)
    if key not in cache:
        q_weight = graph.add_constant(f"{weight.name}_quantized", quantize_weight(weight.const, params))
        q_weight.meta["quant"] = params.to_json()
        if "sparsity" in weight.meta:
            # Symmetric quantization maps 0 to 0, so the recorded pattern still holds.
            q_weight.meta["sparsity"] = dict(weight.meta["sparsity"])
        scale, zero_point = _param_constants(graph, f"{weight.name}", params)
        attrs = {"axis": params.axis} if params.axis is not None else {}
        dq = graph.add_node("DequantizeLinear", [q_weight, scale, zero_point], 1, attrs=attrs,
                            name=f"{weight.name}_DequantizeLinear", before=node)
        dq.output.dtype, dq.output.shape = np.dtype(np.float32), weight.shape
        cache[key] = dq.output
    node.set_input(index, cache[key])
    return cache[key].producer.inputs[0]


def insert_activation_qdq(graph: Graph, activation: Value, readers: list[tuple[Node, int]],
                          params: QuantParams) -> Value:
    """Insert Q -> DQ on `activation` for the given (node, input index) readers only.

    Other readers (a residual Add, a graph output) keep the float tensor. Returns the quantized
    (Q output) value, which carries ``meta["quant"]``.
    """
    first = min(readers, key=lambda use: graph.nodes.index(use[0]))[0]
    scale, zero_point = _param_constants(graph, f"{activation.name}", params)
    q = graph.add_node("QuantizeLinear", [activation, scale, zero_point], 1,
                       name=f"{activation.name}_QuantizeLinear", before=first)
    q.output.dtype, q.output.shape = params.zero_point.dtype, activation.shape
    q.output.meta["quant"] = params.to_json()
    dq = graph.add_node("DequantizeLinear", [q.output, scale, zero_point], 1,
                        name=f"{activation.name}_DequantizeLinear", before=first)
    dq.output.dtype, dq.output.shape = np.dtype(np.float32), activation.shape
    for node, index in readers:
        node.set_input(index, dq.output)
    return q.output
