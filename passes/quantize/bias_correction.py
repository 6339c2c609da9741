"""Bias correction (Nagel et al., 2019, data-based variant): remove the mean output shift that
quantizing a layer's weight and input causes, by adding it back to the layer's float bias.

For a linear layer y = f(x, W), linearity gives E[y] = f(E[x], W). With E[x] and E[Q(x)] taken
over the calibration samples (float model inputs of the layer), the shift per output channel is

    shift = mean over non-channel axes of  f(E[x], W) - f(E[Q(x)], DQ(W_int8))

which is computed by running the single layer (without bias) in onnxruntime. Because each layer
is corrected for its own error only (float inputs), corrections do not double count upstream
errors. The bias is the layer's own (Conv/ConvTranspose B, Gemm C) or, for MatMul, the constant
operand of the Add that alone reads its output; layers without a place for a bias are skipped.
This is why biases stay float in our QDQ graphs: they absorb the correction exactly, and
onnxruntime runs a float bias after the integer product without an int32 requantization.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ir import Graph, Node

from .qparams import QuantParams, fake_quantize

__all__ = ["correct_biases"]


def _layer_output(node: Node, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Run `node`'s op alone (no bias) on x and a float weight."""
    from ..calibration import make_session
    attrs = {k: v for k, v in node.attrs.items() if k != "beta"}
    if node.op_type == "Gemm":
        attrs["beta"] = 0.0
    graph = helper.make_graph(
        [helper.make_node(node.op_type, ["x", "w"], ["y"], **attrs)], "layer",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return make_session(model).run(None, {"x": x.astype(np.float32)})[0]


def _channel_mean(y: np.ndarray, op_type: str) -> np.ndarray:
    axis = 1 if op_type in ("Conv", "ConvTranspose") else y.ndim - 1
    return y.mean(axis=tuple(d for d in range(y.ndim) if d != axis))


def _add_to_bias(graph: Graph, node: Node, shift: np.ndarray) -> str | None:
    """Add `shift` [C] to the layer's bias; returns the bias name, or None when there is none."""
    shift = shift.astype(np.float32)
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        bias = node.input(2)
        if node.op_type == "Gemm":
            beta = float(node.attr("beta", 1.0))
            if beta == 0.0:
                return None
            shift = shift / beta
        if bias is None:
            inputs = list(node.inputs) + [None] * (3 - len(node.inputs))
            inputs[2] = graph.add_constant(f"{node.name}_bias_corrected", shift)
            node.inputs = inputs
            return inputs[2].name
        if not bias.is_constant or bias.const.size != shift.size:
            return None
        new = graph.add_constant(f"{bias.name}_corrected",
                                 (bias.const + shift.reshape(bias.const.shape)).astype(np.float32))
        node.set_input(2, new)
        return new.name
    consumers = node.output.consumers()
    if node.op_type == "MatMul" and len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        for index, operand in enumerate(add.inputs):
            if operand is not node.output and operand is not None and operand.is_constant \
                    and operand.const.shape == shift.shape:
                new = graph.add_constant(f"{operand.name}_corrected",
                                         (operand.const + shift).astype(np.float32))
                add.set_input(index, new)
                return new.name
    return None


def correct_biases(graph: Graph, layers: list[tuple[Node, np.ndarray, np.ndarray, QuantParams, str]],
                   inputs: dict[str, list[np.ndarray]]) -> list[dict]:
    """Correct each (node, float weight, dequantized weight, input params, input name) layer.

    `inputs` holds the captured float inputs of the layers, keyed by the input tensor name.
    """
    report = []
    for node, weight, dequantized, act_params, input_name in layers:
        samples = inputs[input_name]
        mean_x = np.mean(samples, axis=0)
        mean_qx = np.mean([fake_quantize(s, act_params) for s in samples], axis=0)
        shift = _channel_mean(_layer_output(node, mean_x, weight), node.op_type) \
            - _channel_mean(_layer_output(node, mean_qx, dequantized), node.op_type)
        where = _add_to_bias(graph, node, shift)
        report.append({"node": node.name, "bias": where,
                       "max_abs_shift": float(np.abs(shift).max()) if where else None})
    graph.remove_unused_constants()
    return report
