"""Apply a quantization plan to a model: QDQ around the chosen layers, with calibrated ranges.

Shared by the pass itself and by the trial models of the mixed-precision search (which quantize a
copy of the model with some layers left in float and measure the outputs).
"""

from __future__ import annotations

import numpy as np

from ir import Model

from .qparams import QuantParams, activation_params, weight_params
from .ranges import activation_range
from .rewrite import insert_activation_qdq, quantize_weight_input
from .targets import QuantTarget

__all__ = ["calibrated_params", "apply_qdq", "apply_activation_matmul_qdq", "output_tensor"]


def output_tensor(target: QuantTarget):
    """The tensor after a layer that `outputs=true` quantizes: the layer's output, moved past an
    Add of a constant (MatMul's bias) and then a Relu when each is the only reader, since
    onnxruntime fuses MatMul + bias and Conv/MatMul + Relu + Q into one int8 kernel."""
    value = target.node.output
    for accepts in (_is_bias_add, lambda node: node.op_type == "Relu"):
        consumers = value.consumers()
        if len(consumers) == 1 and accepts(consumers[0]) and not value.is_graph_output():
            value = consumers[0].output
    return value


def _is_bias_add(node) -> bool:
    return node.op_type == "Add" and any(v is not None and v.is_constant for v in node.inputs)


def calibrated_params(captured: dict[str, list[np.ndarray]], method: str, dtype: str,
                      percentile: float) -> dict[str, QuantParams]:
    """Per-tensor activation parameters from captured calibration tensors."""
    params = {}
    for name, arrays in captured.items():
        samples = np.concatenate([np.asarray(a, np.float32).ravel() for a in arrays])
        lo, hi = activation_range(samples, method, symmetric=dtype == "int8",
                                  percentile=percentile)
        params[name] = activation_params(lo, hi, dtype)
    return params


def apply_qdq(model: Model, targets: list[QuantTarget], activation: dict[str, QuantParams],
              per_channel: bool = True, outputs: bool = False) -> list[dict]:
    """Rewrite `targets` to QDQ form in place; returns one record per layer.

    By default only the layers' own inputs are quantized (other readers keep the float tensor).
    With `outputs`, each layer's output tensor (see `output_tensor`) is quantized too and every
    reader of a quantized tensor reads the DQ output, so that onnxruntime finds complete
    DQ -> op -> Q groups and runs them as int8 kernels (QLinearConv, QGemm, QLinearAdd...).
    """
    graph = model.graph
    tensors: dict[int, tuple] = {}
    for target in targets:
        value = target.activation
        entry = tensors.setdefault(id(value), (value, []))
        entry[1].append((target.node, target.activation_index))
    if outputs:
        for target in targets:
            value = output_tensor(target)
            if value.name in activation:
                tensors.setdefault(id(value), (value, []))
        for key, (value, _) in list(tensors.items()):
            tensors[key] = (value, value.uses())
    for value, readers in tensors.values():
        if readers:
            insert_activation_qdq(graph, value, readers, activation[value.name])
    records, cache = [], {}
    for target in targets:
        weight = target.weight
        params = weight_params(weight.const, target.axis if per_channel else None)
        q_weight = quantize_weight_input(graph, target.node, target.weight_index, params, cache)
        records.append({"node": target.name, "op": target.node.op_type, "weight": weight.name,
                        "quantized_weight": q_weight.name, "axis": params.axis,
                        "channels": int(params.scale.size)})
    graph.toposort()
    graph.remove_unused_constants()
    return records


def apply_activation_matmul_qdq(model: Model, nodes: list, first: dict[str, QuantParams],
                                second: dict[str, QuantParams]) -> list[dict]:
    """Q -> DQ on both inputs of each MatMul of two activations (parameters by tensor name:
    `first` for input 0, `second` for input 1); returns one record per MatMul."""
    graph, records = model.graph, []
    for node in nodes:
        a, b = node.inputs
        pa, pb = first[a.name], second[b.name]
        insert_activation_qdq(graph, a, [(node, 0)], pa)
        insert_activation_qdq(graph, b, [(node, 1)], pb)
        records.append({"node": node.name, "first": a.name, "second": b.name,
                        "first_dtype": pa.dtype, "second_dtype": pb.dtype})
    graph.toposort()
    return records
